//! Crash test: a child process (this same test binary, in "writer mode") writes blobs through
//! both write paths and is SIGKILLed at a random instant; the parent reopens the store and checks
//! every blob is absent, or complete and byte-for-byte correct, or partial with only genuine
//! pieces (proved by completing it, which re-checks the whole-blob sha256). 50 iterations.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peerd_agent::store::{Digest, IoMode, PutOutcome, Source, Store, StoreConfig};
use sha2::Digest as _;

const ENV: &str = "PEERD_CRASH_WRITER_DIR";
const PS: u32 = 16 * 1024;
const BLOBS: u64 = 24;

fn config() -> StoreConfig {
    // Small budget so eviction runs during the crash loop too.
    StoreConfig { piece_size: PS, io: IoMode::Auto, ..StoreConfig::new(3 << 20) }
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed_from_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// Blob `k`: deterministic content, sizes from empty to ~300 KiB, some not piece-aligned.
fn blob(k: u64) -> Vec<u8> {
    let len = match k % 4 {
        0 => (k * 37_123) % (300 << 10),
        1 => (k % 5 + 1) * u64::from(PS),
        2 => 1 + k * 1_000,
        _ => 150 << 10,
    } as usize;
    let mut r = Rng::new(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..len).map(|_| r.next() as u8).collect()
}

fn digest_of(b: &[u8]) -> Digest {
    let mut a = [0u8; 32];
    a.copy_from_slice(&sha2::Sha256::digest(b)[..]);
    Digest::from_sha256_bytes(a)
}

/// Child: writes forever (until killed, or 10 s as a safety net).
#[test]
fn crash_writer_child() {
    let Some(dir) = std::env::var_os(ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = Store::open(Path::new(&dir), config()).await.unwrap();
        let mut rng = Rng::new(seed_from_time());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let k = rng.below(BLOBS);
            let data = blob(k);
            let d = digest_of(&data);
            match rng.below(5) {
                0 => {
                    let _ = store.remove(&d).await;
                }
                1 | 2 => {
                    let Ok(mut w) = store.writer(&d, data.len() as u64, Source::Upstream("r".into())).await else {
                        continue;
                    };
                    for chunk in data.chunks(5000) {
                        w.write(chunk).await.unwrap();
                    }
                    w.finish().await.unwrap();
                }
                _ => {
                    if store.declare(&d, data.len() as u64).await.is_err() {
                        continue;
                    }
                    let pieces: Vec<&[u8]> = data.chunks(PS as usize).collect();
                    // A few pieces at a time, in random order, concurrently.
                    let mut tasks = Vec::new();
                    for _ in 0..3 {
                        if pieces.is_empty() {
                            break;
                        }
                        let i = rng.below(pieces.len() as u64) as usize;
                        let (s, p) = (store.clone(), pieces[i].to_vec());
                        let h = blake3::hash(&p);
                        tasks.push(tokio::spawn(async move { s.put_piece(&d, i, p, h, Source::Peer("p".into())).await }));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                }
            }
        }
    });
}

/// Checks the reopened store; completes partial blobs with genuine pieces to prove the durable
/// ones are genuine too.
async fn check(dir: &Path, known: &[(Digest, Vec<u8>)]) -> (usize, usize) {
    let store = Store::open(dir, config()).await.expect("store reopens after SIGKILL");
    assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0, "temp files left after restart");
    let mut counts = (0, 0);
    for info in store.list() {
        let (d, data) = known.iter().find(|(d, _)| *d == info.digest).expect("unknown blob in store");
        assert_eq!(info.size, data.len() as u64);
        if info.complete {
            counts.0 += 1;
        } else {
            counts.1 += 1;
            for (i, p) in data.chunks(PS as usize).enumerate() {
                let r = store.put_piece(d, i, p.to_vec(), blake3::hash(p), Source::Peer("check".into())).await;
                assert!(
                    matches!(r, Ok(PutOutcome::Stored | PutOutcome::Completed | PutOutcome::AlreadyPresent)),
                    "completing partial blob {d}: {r:?}"
                );
            }
        }
        assert!(store.has(d));
        assert_eq!(&store.read_range(d, 0, data.len() as u64).await.unwrap(), data, "blob {d} corrupt");
        let path = store.blob_file_path(d).unwrap();
        assert_eq!(&std::fs::read(path).unwrap()[..data.len()], &data[..]);
        let m = store.manifest(d).unwrap();
        assert_eq!(m.pieces, data.chunks(PS as usize).map(blake3::hash).collect::<Vec<_>>());
    }
    // Nothing but the listed blobs' files on disk.
    let files = std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count();
    assert_eq!(files, 2 * store.list().len());
    counts
}

#[test]
fn sigkill_mid_write_leaves_consistent_store() {
    if std::env::var_os(ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let known: Vec<(Digest, Vec<u8>)> = (0..BLOBS).map(|k| (digest_of(&blob(k)), blob(k))).collect();
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rng = Rng::new(seed_from_time());
    let started = Instant::now();
    let (mut complete, mut partial) = (0, 0);
    for iter in 0..50 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_writer_child", "--nocapture", "--test-threads=1"])
            .env(ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + rng.below(120)));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let status = child.wait().unwrap();
        assert!(status.code().is_none(), "iteration {iter}: child exited by itself ({status}) instead of being killed");
        let (c, p) = rt.block_on(check(dir.path(), &known));
        complete += c;
        partial += p;
        assert!(started.elapsed() < Duration::from_secs(90), "crash loop too slow");
    }
    eprintln!(
        "50 SIGKILLs in {:?}; blobs seen after restart: {complete} complete, {partial} partial (completed by check)",
        started.elapsed()
    );
    assert!(complete + partial > 0, "the child never got to write anything");
}
