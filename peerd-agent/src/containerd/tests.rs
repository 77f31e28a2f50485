//! A temp dir laid out like containerd's content store: scan, lazy verification, piece hashes
//! equal to the store's, removal and change noticed.

use std::path::Path;

use sha2::Digest as _;

use super::*;
use crate::store::{Source, Store, StoreConfig};

const PS: u32 = 4096;

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 8) as u8) ^ seed).collect()
}

fn digest_of(b: &[u8]) -> Digest {
    Digest::from_sha256_bytes(sha2::Sha256::digest(b).into())
}

/// `<root>/blobs/sha256/` and an `ingest/` with a write in progress, as containerd has them.
fn layout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
    let ingest = dir.path().join("ingest/0123abcd");
    std::fs::create_dir_all(&ingest).unwrap();
    std::fs::write(ingest.join("data"), b"half a blob").unwrap();
    std::fs::write(ingest.join("ref"), b"default/1/layer-sha256:...").unwrap();
    dir
}

/// Writes `data` under its own sha256 name.
fn put(root: &Path, data: &[u8]) -> Digest {
    let d = digest_of(data);
    std::fs::write(root.join("blobs/sha256").join(d.hex()), data).unwrap();
    d
}

fn source(root: &Path) -> Arc<ContainerdContent> {
    Arc::new(ContainerdContent::new(ContainerdConfig::new(root, PS)))
}

#[tokio::test]
async fn scan_lists_complete_blobs_only() {
    let dir = layout();
    let a = put(dir.path(), &bytes(1, 10_000));
    let b = put(dir.path(), &bytes(2, 5));
    // Not blobs: junk names, a directory, a symlink named like a digest.
    std::fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x").unwrap();
    std::fs::create_dir(dir.path().join("blobs/sha256").join("ab".repeat(32))).unwrap();
    let target = dir.path().join("blobs/sha256").join(a.hex());
    std::os::unix::fs::symlink(&target, dir.path().join("blobs/sha256").join(digest_of(b"other").hex())).unwrap();
    let c = source(dir.path());
    assert!(c.is_empty());
    let r = c.scan().unwrap();
    assert_eq!((r.blobs, r.added, r.removed), (2, 2, 0));
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(c.digests(), want);
    // Nothing is hashed by a scan: verification waits for first use.
    assert_eq!(c.cached(), 0);
    assert_eq!(c.counters().verified.load(Ordering::Relaxed), 0);
    // A second scan finds the same, nothing added.
    let r = c.scan().unwrap();
    assert_eq!((r.blobs, r.added, r.removed), (2, 0, 0));
}

#[tokio::test]
async fn a_missing_directory_is_empty_and_start_is_off() {
    let dir = tempfile::tempdir().unwrap();
    // The content dir exists but containerd has stored nothing yet.
    let c = source(dir.path());
    assert_eq!(c.scan().unwrap().blobs, 0);
    assert!(ContainerdContent::start(ContainerdConfig::new(dir.path().join("absent"), PS)).await.is_none());
    assert!(ContainerdContent::start(ContainerdConfig::new(dir.path(), PS)).await.is_some());
}

#[tokio::test]
async fn verification_is_lazy_and_a_wrong_name_is_never_served() {
    let dir = layout();
    let data = bytes(3, 3 * PS as usize + 17);
    let good = put(dir.path(), &data);
    // Content that does not match its name.
    let liar = digest_of(b"what the name promises");
    std::fs::write(dir.path().join("blobs/sha256").join(liar.hex()), bytes(4, 9000)).unwrap();
    let c = source(dir.path());
    c.scan().unwrap();
    assert!(c.contains(&liar), "advertised until it is checked");
    assert!(c.cached_manifest(&good).is_none());

    let m = c.manifest(&good).await.unwrap();
    assert_eq!((m.size, m.piece_size, m.pieces.len()), (data.len() as u64, PS, 4));
    assert_eq!(c.cached_manifest(&good).as_deref(), Some(&*m));
    let pieces = c.read_pieces(&good, 1, 3).await.unwrap();
    assert_eq!(pieces.concat(), data[PS as usize..]);
    assert_eq!(c.counters().bytes_served.load(Ordering::Relaxed), (data.len() - PS as usize) as u64);

    assert!(matches!(c.manifest(&liar).await, Err(ContainerdError::Mismatch(_))));
    assert_eq!(c.counters().verify_failed.load(Ordering::Relaxed), 1);
    assert!(!c.contains(&liar) && !c.digests().contains(&liar), "withdrawn from the advertisement");
    assert!(matches!(c.read_pieces(&liar, 0, 1).await, Err(ContainerdError::NotPresent(_))));
    // Skipped by later scans while the file stays the same, and not verified again.
    let r = c.scan().unwrap();
    assert_eq!((r.blobs, r.bad), (1, 1));
    assert!(matches!(c.manifest(&liar).await, Err(ContainerdError::Mismatch(_))));
    assert_eq!(c.counters().verify_failed.load(Ordering::Relaxed), 1);
    assert_eq!(c.counters().verified.load(Ordering::Relaxed), 1);

    // containerd replaces the file with the right content: it counts again.
    let right = b"what the name promises";
    let tmp = dir.path().join("blobs/tmp");
    std::fs::write(&tmp, right).unwrap();
    std::fs::rename(&tmp, dir.path().join("blobs/sha256").join(liar.hex())).unwrap();
    assert_eq!(c.scan().unwrap().added, 1);
    assert!(matches!(c.read_pieces(&liar, 0, 1).await, Err(ContainerdError::Verifying(_))), "not served before it is verified");
    assert_eq!(c.manifest(&liar).await.unwrap().size, right.len() as u64);
}

#[tokio::test]
async fn piece_hashes_equal_the_stores() {
    let dir = layout();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::open(sdir.path(), StoreConfig { piece_size: PS, ..StoreConfig::new(1 << 30) }).await.unwrap();
    let c = source(dir.path());
    for (i, len) in [1usize, PS as usize, 3 * PS as usize, 5 * PS as usize + 1234].into_iter().enumerate() {
        let data = bytes(10 + i as u8, len);
        let d = put(dir.path(), &data);
        let mut w = store.writer(&d, data.len() as u64, Source::Upstream("test".into())).await.unwrap();
        w.write(&data).await.unwrap();
        w.finish().await.unwrap();
        c.scan().unwrap();
        let ours = c.manifest(&d).await.unwrap();
        assert_eq!(Some(&*ours), store.manifest(&d).as_ref(), "{len} bytes");
        let n = ours.pieces.len() as u32;
        let all = c.read_pieces(&d, 0, n).await.unwrap().concat();
        assert_eq!(all, store.read_range(&d, 0, len as u64).await.unwrap());
    }
}

#[tokio::test]
async fn the_default_piece_size_too() {
    let dir = layout();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::open(sdir.path(), StoreConfig::new(1 << 30)).await.unwrap();
    let data = bytes(20, (5 << 20) / 2);
    let d = put(dir.path(), &data);
    let mut w = store.writer(&d, data.len() as u64, Source::Upstream("test".into())).await.unwrap();
    w.write(&data).await.unwrap();
    w.finish().await.unwrap();
    let c = Arc::new(ContainerdContent::new(ContainerdConfig::new(dir.path(), store.piece_size())));
    c.scan().unwrap();
    let m = c.manifest(&d).await.unwrap();
    assert_eq!(m.pieces.len(), 3);
    assert_eq!(Some(&*m), store.manifest(&d).as_ref());
}

#[tokio::test]
async fn removal_is_noticed_and_withdrawn() {
    let dir = layout();
    let a = put(dir.path(), &bytes(5, 2 * PS as usize));
    let b = put(dir.path(), &bytes(6, 100));
    let c = source(dir.path());
    c.scan().unwrap();
    c.manifest(&a).await.unwrap();
    std::fs::remove_file(dir.path().join("blobs/sha256").join(a.hex())).unwrap();
    let r = c.scan().unwrap();
    assert_eq!((r.blobs, r.removed), (1, 1));
    assert_eq!(c.digests(), vec![b]);
    assert_eq!(c.cached(), 0, "its hashes are dropped");
    assert!(matches!(c.read_pieces(&a, 0, 1).await, Err(ContainerdError::NotPresent(_))));
    assert!(matches!(c.manifest(&a).await, Err(ContainerdError::NotPresent(_))));
    assert_eq!(c.counters().removed.load(Ordering::Relaxed), 1);
    // The whole directory going away withdraws everything.
    std::fs::remove_dir_all(dir.path().join("blobs")).unwrap();
    assert_eq!(c.scan().unwrap().removed, 1);
    assert!(c.is_empty());
}

#[tokio::test]
async fn a_file_that_vanishes_or_changes_after_verification_is_withdrawn() {
    let dir = layout();
    let data = bytes(7, 3 * PS as usize);
    let d = put(dir.path(), &data);
    let path = dir.path().join("blobs/sha256").join(d.hex());
    let c = source(dir.path());
    c.scan().unwrap();
    c.manifest(&d).await.unwrap();

    // Gone before the next scan: the read fails and the blob is withdrawn at once.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(c.read_pieces(&d, 0, 1).await, Err(ContainerdError::Changed { .. })));
    assert!(!c.contains(&d));
    assert_eq!(c.counters().changed.load(Ordering::Relaxed), 1);

    // Back, verified, then rewritten in place with its old size and mtime restored: only the
    // per-piece blake3 can tell, and it does.
    std::fs::write(&path, &data).unwrap();
    c.scan().unwrap();
    c.manifest(&d).await.unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let mut other = data.clone();
    other[PS as usize + 5] ^= 0xff;
    std::fs::write(&path, &other).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    c.read_pieces(&d, 0, 1).await.unwrap();
    assert!(matches!(c.read_pieces(&d, 1, 1).await, Err(ContainerdError::Mismatch(_))));
    assert!(!c.contains(&d));
    assert_eq!(c.counters().verify_failed.load(Ordering::Relaxed), 1);
    // And it stays out while the file is that version.
    assert_eq!(c.scan().unwrap().bad, 1);
    assert!(!c.contains(&d));

    // A size change is noticed by the file check before any byte is read.
    let e = bytes(8, 2 * PS as usize);
    let d2 = put(dir.path(), &e);
    c.scan().unwrap();
    c.manifest(&d2).await.unwrap();
    std::fs::OpenOptions::new().append(true).open(dir.path().join("blobs/sha256").join(d2.hex())).unwrap().write_all_at(b"more", e.len() as u64).unwrap();
    assert!(matches!(c.read_pieces(&d2, 0, 1).await, Err(ContainerdError::Changed { .. })));
    assert!(!c.contains(&d2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_verify_once() {
    let dir = layout();
    let d = put(dir.path(), &bytes(9, 64 * PS as usize));
    let c = source(dir.path());
    c.scan().unwrap();
    let tasks: Vec<_> = (0..8).map(|_| {
        let c = c.clone();
        tokio::spawn(async move { c.manifest(&d).await.map(|m| m.pieces.len()) })
    }).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 64);
    }
    assert_eq!(c.counters().verified.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn the_hash_cache_is_bounded() {
    let dir = layout();
    let a = put(dir.path(), &bytes(11, 2 * PS as usize));
    let b = put(dir.path(), &bytes(12, 2 * PS as usize));
    let c = Arc::new(ContainerdContent::new(ContainerdConfig { max_cached_pieces: 3, ..ContainerdConfig::new(dir.path(), PS) }));
    c.scan().unwrap();
    c.manifest(&a).await.unwrap();
    c.manifest(&b).await.unwrap();
    assert_eq!(c.cached(), 1);
    assert!(c.cached_manifest(&a).is_none() && c.cached_manifest(&b).is_some());
    // Still advertised; asked again, it is verified again.
    assert!(c.contains(&a));
    c.manifest(&a).await.unwrap();
    assert_eq!(c.counters().verified.load(Ordering::Relaxed), 3);
}
