//! Store behaviour tests: integrity, waiting, eviction, restart, full disk.

use std::path::Path;
use std::time::Duration;

use sha2::Digest as _;

use super::*;

const PS: u32 = 4096;

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn digest_of(b: &[u8]) -> Digest {
    let out = sha2::Sha256::digest(b);
    let mut a = [0u8; 32];
    a.copy_from_slice(&out[..]);
    Digest::from_sha256_bytes(a)
}

fn hashes(b: &[u8], ps: u32) -> Vec<blake3::Hash> {
    b.chunks(ps as usize).map(blake3::hash).collect()
}

fn cfg(budget: u64, io: IoMode) -> StoreConfig {
    StoreConfig { piece_size: PS, io, ..StoreConfig::new(budget) }
}

fn peer(s: &str) -> Source {
    Source::Peer(s.into())
}

async fn put_all(store: &Store, data: &[u8]) -> Digest {
    let d = digest_of(data);
    let mut w = store.writer(&d, data.len() as u64, Source::Upstream("registry".into())).await.unwrap();
    for chunk in data.chunks(1000) {
        w.write(chunk).await.unwrap();
    }
    w.finish().await.unwrap();
    d
}

fn tmp_entries(root: &Path) -> usize {
    std::fs::read_dir(root.join("tmp")).map(|r| r.count()).unwrap_or(0)
}

async fn round_trip(io: IoMode) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, io)).await.unwrap();
    if io == IoMode::Blocking {
        assert_eq!(store.stats().io_backend, "blocking");
    }
    let data = bytes(1, 3 * PS as usize + 123);
    let d = put_all(&store, &data).await;
    assert!(store.has(&d));
    assert_eq!(store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    assert_eq!(store.read_range(&d, 4000, 5000).await.unwrap(), &data[4000..9000]);
    assert!(matches!(store.read_range(&d, 1, data.len() as u64).await, Err(StoreError::OutOfRange { .. })));
    let m = store.manifest(&d).unwrap();
    assert_eq!((m.size, m.piece_size, m.pieces.clone()), (data.len() as u64, PS, hashes(&data, PS)));
    assert_eq!(std::fs::read(store.blob_file_path(&d).unwrap()).unwrap(), data);
    // Peer path into a second store using that manifest, pieces out of order.
    let dir2 = tempfile::tempdir().unwrap();
    let s2 = Store::open(dir2.path(), StoreConfig { verify_reads: true, ..cfg(1 << 30, io) }).await.unwrap();
    s2.declare(&d, m.size).await.unwrap();
    for i in [3, 1, 0] {
        let piece = data[i * PS as usize..].iter().take(PS as usize).copied().collect();
        assert_eq!(s2.put_piece(&d, i, piece, m.pieces[i], peer("a")).await.unwrap(), PutOutcome::Stored);
    }
    assert!(!s2.has(&d));
    assert!(s2.manifest(&d).is_none(), "no manifest before the sha256 check");
    assert_eq!(s2.complete_size(&d), None);
    // Range over present pieces 0..2 is readable before the blob completes.
    assert_eq!(s2.read_range(&d, 10, 2 * PS as u64 - 10).await.unwrap(), &data[10..2 * PS as usize]);
    let piece2 = data[2 * PS as usize..3 * PS as usize].to_vec();
    assert_eq!(s2.put_piece(&d, 2, piece2.clone(), m.pieces[2], peer("b")).await.unwrap(), PutOutcome::Completed);
    assert_eq!(s2.put_piece(&d, 2, piece2, m.pieces[2], peer("b")).await.unwrap(), PutOutcome::AlreadyPresent);
    assert!(s2.has(&d));
    assert_eq!(s2.complete_size(&d), Some(m.size));
    assert_eq!(s2.manifest(&d), Some(m));
    assert_eq!(s2.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    assert_eq!(s2.list().len(), 1);
    assert!(s2.remove(&d).await.unwrap());
    assert!(!s2.has(&d) && s2.list().is_empty() && s2.stats().used_bytes == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_auto_io() {
    round_trip(IoMode::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_forced_blocking_io() {
    round_trip(IoMode::Blocking).await;
}

#[tokio::test]
async fn corrupt_piece_is_rejected_and_never_readable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let data = bytes(2, 2 * PS as usize);
    let (d, h) = (digest_of(&data), hashes(&data, PS));
    store.declare(&d, data.len() as u64).await.unwrap();
    let mut bad = data[..PS as usize].to_vec();
    bad[17] ^= 1;
    let err = store.put_piece(&d, 0, bad, h[0], peer("10.0.0.9")).await.unwrap_err();
    assert!(matches!(&err, StoreError::PieceMismatch { index: 0, from, .. } if *from == peer("10.0.0.9")));
    assert!(err.to_string().contains("peer 10.0.0.9"), "{err}");
    let read = tokio::time::timeout(Duration::from_millis(100), store.read_range(&d, 0, 10)).await;
    assert!(read.is_err(), "corrupt piece must not become readable");
    // Wrong length is rejected too.
    assert!(matches!(store.put_piece(&d, 0, vec![0; 5], h[0], peer("x")).await, Err(StoreError::BadPiece { .. })));
    assert!(matches!(store.put_piece(&d, 9, vec![0; 5], h[0], peer("x")).await, Err(StoreError::BadPiece { .. })));
    // The genuine piece is accepted afterwards.
    assert_eq!(store.put_piece(&d, 0, data[..PS as usize].to_vec(), h[0], peer("b")).await.unwrap(), PutOutcome::Stored);
    assert_eq!(store.read_range(&d, 0, 10).await.unwrap(), &data[..10]);
}

#[tokio::test]
async fn wrong_sha256_drops_blob_and_names_source() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let good = bytes(3, 2 * PS as usize + 5);
    let liar = bytes(4, good.len());
    let d = digest_of(&good);

    // Upstream: the registry sent other bytes.
    let mut w = store.writer(&d, good.len() as u64, Source::Upstream("registry.example".into())).await.unwrap();
    w.write(&liar).await.unwrap();
    let err = w.finish().await.unwrap_err();
    match &err {
        StoreError::DigestMismatch { digest, from } => {
            assert_eq!((*digest, from.clone()), (d, vec![Source::Upstream("registry.example".into())]));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("upstream registry.example"), "{err}");
    assert!(!store.has(&d) && store.list().is_empty() && store.stats().used_bytes == 0);
    assert_eq!(tmp_entries(dir.path()), 0);

    // Peers: each piece matches the (lying) manifest, the whole does not match the digest.
    store.declare(&d, good.len() as u64).await.unwrap();
    let lh = hashes(&liar, PS);
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.read_range(&d, 2 * PS as u64, 5).await })
    };
    for (i, p) in liar.chunks(PS as usize).enumerate() {
        let src = peer(if i == 0 { "p1" } else { "p2" });
        let r = store.put_piece(&d, i, p.to_vec(), lh[i], src).await;
        if i < 2 {
            assert_eq!(r.unwrap(), PutOutcome::Stored);
        } else {
            match r {
                Err(StoreError::DigestMismatch { from, .. }) => assert_eq!(from, vec![peer("p1"), peer("p2")]),
                r => panic!("unexpected {r:?}"),
            }
        }
    }
    assert!(!store.has(&d) && store.list().is_empty());
    assert!(!dir.path().join("blobs/sha256").join(format!("{}.data", d.hex())).exists());
    // A reader waiting on the last piece sees the piece (blake3-verified) or the drop, never hangs.
    let r = tokio::time::timeout(Duration::from_secs(5), reader).await.unwrap().unwrap();
    assert!(matches!(r, Ok(_) | Err(StoreError::Dropped(_)) | Err(StoreError::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_waits_for_piece_written_later() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let data = bytes(5, 3 * PS as usize);
    let (d, h) = (digest_of(&data), hashes(&data, PS));
    store.declare(&d, data.len() as u64).await.unwrap();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.read_range(&d, PS as u64 + 100, 200).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(readers.iter().all(|r| !r.is_finished()), "readers must wait for the piece");
    store.put_piece(&d, 0, data[..PS as usize].to_vec(), h[0], peer("a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(readers.iter().all(|r| !r.is_finished()), "another piece must not satisfy them");
    store.put_piece(&d, 1, data[PS as usize..2 * PS as usize].to_vec(), h[1], peer("a")).await.unwrap();
    for r in readers {
        let got = tokio::time::timeout(Duration::from_secs(5), r).await.unwrap().unwrap().unwrap();
        assert_eq!(got, &data[PS as usize + 100..PS as usize + 300]);
    }
    store.wait_piece(&d, 1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stream_is_not_readable_before_sha256_check() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let data = bytes(6, 4 * PS as usize);
    let d = digest_of(&data);
    let mut w = store.writer(&d, data.len() as u64, Source::Upstream("r".into())).await.unwrap();
    w.write(&data[..3 * PS as usize]).await.unwrap();
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.read_range(&d, 0, 16).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!reader.is_finished(), "pieces of an unverified stream must not be served");
    assert!(store.manifest(&d).is_none() && store.blob_file_path(&d).is_none() && !store.has(&d));
    assert!(matches!(store.writer(&d, 1, Source::Upstream("r".into())).await, Err(StoreError::Exists(_))));
    assert!(matches!(store.remove(&d).await, Err(StoreError::Pinned(_))));
    w.write(&data[3 * PS as usize..]).await.unwrap();
    w.finish().await.unwrap();
    assert_eq!(reader.await.unwrap().unwrap(), &data[..16]);

    // An abandoned stream wakes its readers with an error and leaves nothing behind.
    let data2 = bytes(7, 2 * PS as usize);
    let d2 = digest_of(&data2);
    let mut w = store.writer(&d2, data2.len() as u64, Source::Upstream("r".into())).await.unwrap();
    w.write(&data2[..PS as usize + 1]).await.unwrap();
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.read_range(&d2, 0, 16).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(w);
    let r = tokio::time::timeout(Duration::from_secs(5), reader).await.unwrap().unwrap();
    assert!(matches!(r, Err(StoreError::Dropped(_)) | Err(StoreError::NotFound(_))), "{r:?}");
    assert_eq!(tmp_entries(dir.path()), 0);
    assert!(!store.has(&d2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_is_written_by_only_one_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let data = bytes(8, 64 * PS as usize);
    let (d, h) = (digest_of(&data), hashes(&data, PS));
    store.declare(&d, data.len() as u64).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4 {
        for i in 0..64 {
            let (store, piece, h) = (store.clone(), data[i * PS as usize..(i + 1) * PS as usize].to_vec(), h[i]);
            tasks.push(tokio::spawn(async move { (i, store.put_piece(&d, i, piece, h, peer(&w.to_string())).await) }));
        }
    }
    let mut stored = [0usize; 64];
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r.unwrap() {
            PutOutcome::Stored | PutOutcome::Completed => stored[i] += 1,
            PutOutcome::AlreadyPresent | PutOutcome::InFlight => {}
        }
    }
    assert!(stored.iter().all(|&n| n == 1), "{stored:?}");
    assert!(store.has(&d));
    assert_eq!(store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
}

#[tokio::test]
async fn lru_eviction_respects_watermarks_and_pins() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * PS as usize;
    let store = Store::open(dir.path(), cfg(10 * size as u64, IoMode::Auto)).await.unwrap();
    let mut ds = Vec::new();
    for i in 0..9 {
        ds.push(put_all(&store, &bytes(100 + i, size)).await);
    }
    assert_eq!(store.stats().evictions, 0, "90% is not over the high watermark");
    store.read_range(&ds[0], 0, 1).await.unwrap(); // 0 becomes most recent
    let pin = store.pin(&ds[1]).unwrap();
    let d9 = put_all(&store, &bytes(109, size)).await;
    // 90% + 10% > 90%: evict LRU unpinned (2, 3) down to 80%.
    let present: Vec<bool> = ds.iter().map(|d| store.has(d)).collect();
    assert_eq!(present, [true, true, false, false, true, true, true, true, true]);
    assert!(store.has(&d9));
    let s = store.stats();
    assert_eq!((s.evictions, s.used_bytes, s.blobs), (2, 8 * size as u64, 8));
    assert!(matches!(store.remove(&ds[1]).await, Err(StoreError::Pinned(_))));
    drop(pin);
    assert!(store.remove(&ds[1]).await.unwrap());
    let big = bytes(1, 11 * size);
    let err = store.writer(&digest_of(&big), big.len() as u64, Source::Upstream("r".into())).await;
    assert!(matches!(err, Err(StoreError::TooLarge { .. })));
    // Files of evicted blobs are gone.
    let files = std::fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count();
    assert_eq!(files, 2 * 7);
}

#[tokio::test]
async fn pieces_are_readable_at_once_and_recorded_within_the_sync_interval() {
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_millis(200);
    let data = bytes(30, 4 * PS as usize + 5);
    let (d, h) = (digest_of(&data), hashes(&data, PS));
    let meta_pieces = || {
        let text = std::fs::read_to_string(dir.path().join("blobs/sha256").join(format!("{}.meta", d.hex()))).unwrap();
        let m = meta::Meta::decode(&d, &text).unwrap();
        (m.pieces.iter().filter(|p| p.is_some()).count(), m.complete)
    };
    let store = Store::open(dir.path(), StoreConfig { sync_interval: interval, ..cfg(1 << 30, IoMode::Auto) }).await.unwrap();
    store.declare(&d, data.len() as u64).await.unwrap();
    let piece = |i: usize| data[i * PS as usize..((i + 1) * PS as usize).min(data.len())].to_vec();
    // Out of order: the prefix hasher takes 0 and 1 in as they land, the rest at completion.
    for i in [1, 0, 3] {
        assert_eq!(store.put_piece(&d, i, piece(i), h[i], peer("a")).await.unwrap(), PutOutcome::Stored);
    }
    assert_eq!(store.read_range(&d, 0, 2 * PS as u64).await.unwrap(), &data[..2 * PS as usize]);
    assert_eq!(meta_pieces(), (0, false), "recorded only after the interval");
    tokio::time::sleep(interval * 3).await;
    assert_eq!(meta_pieces(), (3, false));
    assert_eq!(store.put_piece(&d, 2, piece(2), h[2], peer("a")).await.unwrap(), PutOutcome::Stored);
    assert_eq!(store.put_piece(&d, 4, piece(4), h[4], peer("a")).await.unwrap(), PutOutcome::Completed);
    // Completion is recorded durably before it is visible.
    assert!(store.has(&d));
    assert_eq!(meta_pieces(), (5, true));
    assert_eq!(store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    drop(store);
    tokio::time::sleep(interval * 2).await;
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    assert!(store.has(&d));
}

#[tokio::test]
async fn lying_manifest_is_caught_with_the_incremental_sha256() {
    // Every piece matches the hashes it was given, in order (the prefix hasher sees each piece
    // from memory), but the blob is not the digest's: dropped at the last piece.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let real = bytes(31, 3 * PS as usize);
    let fake = bytes(32, 3 * PS as usize);
    let d = digest_of(&real);
    let h = hashes(&fake, PS);
    store.declare(&d, fake.len() as u64).await.unwrap();
    for i in 0..2 {
        store.put_piece(&d, i, fake[i * PS as usize..(i + 1) * PS as usize].to_vec(), h[i], peer("liar")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = store.put_piece(&d, 2, fake[2 * PS as usize..].to_vec(), h[2], peer("liar")).await.unwrap_err();
    assert!(matches!(&err, StoreError::DigestMismatch { from, .. } if *from == vec![peer("liar")]), "{err}");
    assert!(!store.has(&d) && store.list().is_empty());
}

#[tokio::test]
async fn read_piece_serves_fresh_pieces_of_this_incarnation_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let real = bytes(33, 2 * PS as usize);
    let fake = bytes(34, 2 * PS as usize);
    let d = digest_of(&real);
    // A liar's pieces (consistent with its manifest) land, then fail the sha256: dropped.
    let hf = hashes(&fake, PS);
    store.declare(&d, real.len() as u64).await.unwrap();
    store.put_piece(&d, 0, fake[..PS as usize].to_vec(), hf[0], peer("liar")).await.unwrap();
    assert_eq!(store.read_piece(&d, 0).await.unwrap(), &fake[..PS as usize]);
    assert!(store.put_piece(&d, 1, fake[PS as usize..].to_vec(), hf[1], peer("liar")).await.is_err());
    // The blob again, from an honest peer: only its own pieces are ever served.
    let hr = hashes(&real, PS);
    store.declare(&d, real.len() as u64).await.unwrap();
    store.put_piece(&d, 0, real[..PS as usize].to_vec(), hr[0], peer("honest")).await.unwrap();
    assert_eq!(store.read_piece(&d, 0).await.unwrap(), &real[..PS as usize]);
    assert!(tokio::time::timeout(Duration::from_millis(100), store.read_piece(&d, 1)).await.is_err(), "missing piece waits");
    store.put_piece(&d, 1, real[PS as usize..].to_vec(), hr[1], peer("honest")).await.unwrap();
    assert!(store.has(&d));
    // Past the in-memory window, pieces come from the file.
    for k in 0..RECENT_PIECES as u64 + 1 {
        let other = bytes(100 + k, PS as usize);
        let od = digest_of(&other);
        store.declare(&od, other.len() as u64).await.unwrap();
        store.put_piece(&od, 0, other.clone(), blake3::hash(&other), peer("x")).await.unwrap();
    }
    assert_eq!(store.read_piece(&d, 1).await.unwrap(), &real[PS as usize..]);
    assert!(matches!(store.read_piece(&d, 2).await, Err(StoreError::BadPiece { .. })));
}

#[tokio::test]
async fn restart_keeps_complete_blobs_and_cleans_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let complete = bytes(20, 5 * PS as usize + 7);
    let partial = bytes(21, 4 * PS as usize);
    let (dc, dp) = (digest_of(&complete), digest_of(&partial));
    let hp = hashes(&partial, PS);
    let streaming = bytes(22, 3 * PS as usize);
    let ds = digest_of(&streaming);
    {
        // Every piece recorded before put_piece returns, so the crash below keeps them.
        let store = Store::open(dir.path(), StoreConfig { sync_interval: Duration::ZERO, ..cfg(1 << 30, IoMode::Auto) }).await.unwrap();
        put_all(&store, &complete).await;
        store.declare(&dp, partial.len() as u64).await.unwrap();
        for i in [0, 2] {
            store.put_piece(&dp, i, partial[i * PS as usize..(i + 1) * PS as usize].to_vec(), hp[i], peer("a")).await.unwrap();
        }
        let mut w = store.writer(&ds, streaming.len() as u64, Source::Upstream("r".into())).await.unwrap();
        w.write(&streaming[..2 * PS as usize]).await.unwrap();
        std::mem::forget(w); // like a crash: no cleanup runs
        assert!(tmp_entries(dir.path()) > 0);
    }
    // Debris a crash could leave: a metadata temp file and an orphan data file.
    std::fs::write(dir.path().join("tmp/whatever.meta.1.2"), b"half").unwrap();
    let orphan = Digest::from_sha256_bytes([9; 32]);
    std::fs::write(dir.path().join("blobs/sha256").join(format!("{}.data", orphan.hex())), b"x").unwrap();

    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    assert_eq!(tmp_entries(dir.path()), 0);
    assert!(store.has(&dc));
    assert_eq!(store.read_range(&dc, 0, complete.len() as u64).await.unwrap(), complete);
    assert_eq!(store.manifest(&dc).unwrap().pieces, hashes(&complete, PS));
    assert!(!store.has(&ds) && !store.has(&orphan));
    let listed: Vec<Digest> = store.list().iter().map(|b| b.digest).collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&dc) && listed.contains(&dp));
    // The partial blob resumes: its durable pieces are readable, the rest can still arrive.
    assert_eq!(store.read_range(&dp, 2 * PS as u64, 10).await.unwrap(), &partial[2 * PS as usize..2 * PS as usize + 10]);
    for i in [1, 3] {
        store.put_piece(&dp, i, partial[i * PS as usize..(i + 1) * PS as usize].to_vec(), hp[i], peer("b")).await.unwrap();
    }
    assert!(store.has(&dp));
    assert_eq!(store.read_range(&dp, 0, partial.len() as u64).await.unwrap(), partial);
    assert_eq!(std::fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count(), 4);
}

/// A small tmpfs, unmounted (lazily, so open fds cannot block it) even if the test fails.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).ok()?;
        let opts = std::ffi::CString::new(format!("size={size}")).ok()?;
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let r = unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, opts.as_ptr().cast()) };
        if r != 0 {
            eprintln!("cannot mount tmpfs ({}); skipping", std::io::Error::last_os_error());
            return None;
        }
        Some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(p) = std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()) {
            // SAFETY: valid path string.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fails_cleanly_and_keeps_stored_blobs() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let root = fs.dir.path().join("store");
    // Budget far above the disk: the budget does not save us, ENOSPC handling must.
    let store = Store::open(&root, StoreConfig { piece_size: 64 * 1024, ..StoreConfig::new(1 << 30) }).await.unwrap();
    let kept = bytes(30, 1 << 20);
    let dk = {
        let d = digest_of(&kept);
        let mut w = store.writer(&d, kept.len() as u64, Source::Upstream("r".into())).await.unwrap();
        w.write(&kept).await.unwrap();
        w.finish().await.unwrap();
        d
    };
    let peer_blob = bytes(31, 256 * 1024);
    let dpb = digest_of(&peer_blob);
    store.declare(&dpb, peer_blob.len() as u64).await.unwrap();
    let h = hashes(&peer_blob, 64 * 1024);
    store.put_piece(&dpb, 0, peer_blob[..64 * 1024].to_vec(), h[0], peer("a")).await.unwrap();

    let big = bytes(32, 5 << 20);
    let db = digest_of(&big);
    let err = match store.writer(&db, big.len() as u64, Source::Upstream("r".into())).await {
        Err(e) => e,
        Ok(mut w) => match w.write(&big).await {
            Err(e) => e,
            Ok(()) => w.finish().await.unwrap_err(),
        },
    };
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    let err = store.declare(&db, big.len() as u64).await.unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert!(!store.has(&db));
    assert_eq!(tmp_entries(&root), 0);
    assert_eq!(store.read_range(&dk, 0, kept.len() as u64).await.unwrap(), kept);
    assert_eq!(store.read_range(&dpb, 0, 64 * 1024).await.unwrap(), &peer_blob[..64 * 1024]);
    assert_eq!(store.stats().used_bytes, kept.len() as u64 + peer_blob.len() as u64);
    // Everything still consistent after a restart on the full-then-freed disk.
    drop(store);
    let store = Store::open(&root, StoreConfig::new(1 << 30)).await.unwrap();
    assert_eq!(store.read_range(&dk, 0, kept.len() as u64).await.unwrap(), kept);
    assert_eq!(store.list().len(), 2);
}

/// Gossip re-advertises on these signals instead of polling: the first readable piece, the
/// completed blob and its removal each change `watch_content`; further pieces do not.
#[tokio::test]
async fn content_changes_are_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    let mut rx = store.watch_content();
    let data = bytes(41, PS as usize * 3);
    let d = digest_of(&data);
    let h = hashes(&data, PS);
    store.declare(&d, data.len() as u64).await.unwrap();
    assert!(!rx.has_changed().unwrap(), "declared, nothing readable yet");
    let piece = |i: usize| data[i * PS as usize..(i + 1) * PS as usize].to_vec();
    store.put_piece(&d, 0, piece(0), h[0], peer("a")).await.unwrap();
    assert!(rx.has_changed().unwrap(), "first piece");
    rx.mark_unchanged();
    store.put_piece(&d, 1, piece(1), h[1], peer("a")).await.unwrap();
    assert!(!rx.has_changed().unwrap(), "more pieces of a partial blob change nothing advertised");
    store.put_piece(&d, 2, piece(2), h[2], peer("a")).await.unwrap();
    assert!(store.has(&d));
    assert!(rx.has_changed().unwrap(), "complete");
    rx.mark_unchanged();
    assert!(store.remove(&d).await.unwrap());
    assert!(rx.has_changed().unwrap(), "removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_takes_pieces_from_memory_while_they_are_recent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 30, IoMode::Auto)).await.unwrap();
    // Fewer pieces than the recent list holds, landing out of order: the prefix hasher finds
    // every piece it waited for in memory, none is read back from the file.
    let n = RECENT_PIECES / 2;
    let data = bytes(27, n * PS as usize);
    let d = digest_of(&data);
    let h = hashes(&data, PS);
    store.declare(&d, data.len() as u64).await.unwrap();
    let order: Vec<usize> = (0..n).rev().collect();
    for &i in &order {
        let piece = data[i * PS as usize..(i + 1) * PS as usize].to_vec();
        store.put_piece(&d, i, piece, h[i], peer("p")).await.unwrap();
    }
    assert!(store.has(&d));
    let blob = store.get(&d).unwrap();
    let prefix = blob.sha.lock().await;
    assert_eq!((prefix.from_memory, prefix.from_file), (n, 0));
}
