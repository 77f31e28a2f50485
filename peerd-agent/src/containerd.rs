//! Blobs the node already has in containerd's content store count as this node's content: they
//! are advertised to peers as complete and served to them straight from containerd's files,
//! without a copy in our store (as Azure peerd and Spegel do).
//!
//! This is not part of `store`: the store owns its files (writes, budget, eviction, crash
//! recovery) and only holds bytes it verified on the way in. containerd's directory is someone
//! else's, read-only to us, and changes under our feet; so it is a second, read-only source that
//! `transfer` (serving) and `peers::advertise` (gossip) consult beside the store.
//!
//! containerd keeps complete blobs at `<dir>/blobs/sha256/<hex>` (writes in progress live in
//! `<dir>/ingest/` and are renamed into place when committed, so they are never seen here). A
//! periodic scan keeps the set of names present. A blob's sha256 is checked lazily, the first
//! time a peer asks for it, and the per-piece blake3 hashes of the store's manifest (same piece
//! size) are computed in the same pass and cached (bounded). A file whose content does not match
//! its name is never served: it is counted and skipped until the file changes. Every piece served
//! is re-checked against its cached blake3, so a file modified after verification is withdrawn,
//! not served.
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use sha2::Digest as _;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::store::{Digest, Manifest, PIECE_SIZE};

/// Where containerd keeps its content store by default.
pub const DEFAULT_DIR: &str = "/var/lib/containerd/io.containerd.content.v1.content";

/// Settings; [`ContainerdConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct ContainerdConfig {
    /// containerd's content directory (the one holding `blobs/` and `ingest/`).
    pub dir: PathBuf,
    /// Piece size of the manifests handed to peers: must be the store's, so peers check and
    /// store pieces exactly as they do for blobs from another node's store.
    pub piece_size: u32,
    /// Time between scans (a removal is withdrawn within this, plus gossip's 1 s advertisement).
    pub scan_interval: Duration,
    /// Directory entries looked at per scan (the rest are ignored and counted): bounds the work
    /// and the memory of one scan. Known files cost one getdents entry; only new ones are stat'ed.
    pub max_entries: usize,
    /// Piece hashes kept in memory over all verified blobs (32 bytes each; the default, 256 Ki
    /// pieces = 8 MiB, covers 256 GiB of content). Least recently used blobs are dropped first
    /// and verified again when asked for.
    pub max_cached_pieces: usize,
    /// Blobs hashed at once (each pass reads the whole file and is CPU-bound).
    pub max_verifying: usize,
}

impl ContainerdConfig {
    pub fn new(dir: impl Into<PathBuf>, piece_size: u32) -> Self {
        Self {
            dir: dir.into(),
            piece_size,
            scan_interval: Duration::from_secs(10),
            max_entries: 1 << 20,
            max_cached_pieces: 256 << 10,
            max_verifying: 2,
        }
    }
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        Self::new(DEFAULT_DIR, PIECE_SIZE)
    }
}

/// Errors at this module's boundary.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{0} is not in containerd's content store")]
    NotPresent(Digest),
    #[error("{0} in containerd's content store does not match its name; not served")]
    Mismatch(Digest),
    #[error("{digest} in containerd's content store changed or vanished ({reason}); withdrawn")]
    Changed { digest: Digest, reason: String },
    #[error("{0} is being verified; not served yet")]
    Verifying(Digest),
    #[error("{digest}: pieces {first}..{first}+{count} are outside its {pieces} pieces")]
    OutOfRange { digest: Digest, first: u32, count: u32, pieces: usize },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// Reason-coded counters (exported by `metrics`).
#[derive(Default, Debug)]
pub struct Counters {
    /// Blobs whose sha256 matched their name (piece hashes computed).
    pub verified: AtomicU64,
    /// Blobs whose content did not match their name: skipped until the file changes.
    pub verify_failed: AtomicU64,
    /// Blobs found changed or gone while being verified or served: withdrawn.
    pub changed: AtomicU64,
    /// Blobs a scan found removed from containerd: withdrawn.
    pub removed: AtomicU64,
    /// Reads that failed with an I/O error (the blob is withdrawn until the next scan).
    pub read_errors: AtomicU64,
    /// Bytes of pieces read from containerd's files for peers.
    pub bytes_served: AtomicU64,
    /// Scans that could not list the directory (everything withdrawn until one can).
    pub scan_errors: AtomicU64,
    /// Directory entries past `max_entries`, ignored (summed over scans).
    pub scan_truncated: AtomicU64,
}

/// What identifies one version of a file: a replaced (renamed over) or rewritten file differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> Self {
        FileId { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: (m.mtime(), m.mtime_nsec()) }
    }
}

struct Cached {
    manifest: Arc<Manifest>,
    id: FileId,
    used: u64,
}

/// A verification in progress: `Some(Some(_))` verified, `Some(None)` failed.
type Pending = watch::Receiver<Option<Option<Arc<Manifest>>>>;

#[derive(Default)]
struct State {
    /// Blobs found by the last scan (advertised), by the file version seen.
    present: HashMap<Digest, FileId>,
    /// Files whose content did not match their name, skipped while they stay that version.
    bad: HashMap<Digest, FileId>,
    /// Verified blobs' manifests, least recently used dropped past `max_cached_pieces`.
    cache: HashMap<Digest, Cached>,
    cached_pieces: usize,
    clock: u64,
    verifying: HashMap<Digest, Pending>,
}

impl State {
    fn cached(&mut self, d: &Digest) -> Option<(Arc<Manifest>, FileId)> {
        self.clock += 1;
        let now = self.clock;
        let c = self.cache.get_mut(d)?;
        c.used = now;
        Some((c.manifest.clone(), c.id))
    }

    fn uncache(&mut self, d: &Digest) {
        if let Some(c) = self.cache.remove(d) {
            self.cached_pieces -= c.manifest.pieces.len().max(1);
        }
    }

    /// Forgets `d` entirely until a scan finds it again (in a new version, if it was bad).
    fn withdraw(&mut self, d: &Digest) {
        self.present.remove(d);
        self.uncache(d);
    }

    fn insert(&mut self, d: Digest, manifest: Arc<Manifest>, id: FileId, max: usize) {
        self.uncache(&d);
        let n = manifest.pieces.len().max(1);
        if n > max {
            return;
        }
        while self.cached_pieces + n > max {
            let Some(oldest) = self.cache.iter().min_by_key(|(_, c)| c.used).map(|(d, _)| *d) else { break };
            self.uncache(&oldest);
        }
        self.clock += 1;
        self.cache.insert(d, Cached { manifest, id, used: self.clock });
        self.cached_pieces += n;
    }
}

/// What one scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Blobs present now (advertised).
    pub blobs: usize,
    pub added: usize,
    pub removed: usize,
    /// Names skipped because their file failed verification before.
    pub bad: usize,
    /// Entries ignored past `max_entries`.
    pub truncated: usize,
}

/// containerd's content store as a read-only source of complete blobs. Shared as an `Arc`.
pub struct ContainerdContent {
    cfg: ContainerdConfig,
    blobs: PathBuf,
    state: Mutex<State>,
    slots: Semaphore,
    counters: Counters,
}

/// Outcome of hashing one file.
enum Verified {
    Ok(Manifest, FileId),
    Mismatch(FileId),
    Changed(String),
    Io(std::io::Error),
}

impl crate::metrics::MetricsSource for ContainerdContent {
    fn render(&self, r: &mut prometheus_client::registry::Registry) {
        use crate::metrics::{counter, gauge};
        let c = self.counters();
        counter(r, "containerd_verified", "Blobs in containerd's content store verified (sha256) and hashed into pieces on first use", &c.verified);
        counter(r, "containerd_verify_failed", "Blobs in containerd's content store whose content did not match their name (never served)", &c.verify_failed);
        counter(r, "containerd_changed", "Blobs in containerd's content store withdrawn because they changed or vanished while in use", &c.changed);
        counter(r, "containerd_removed", "Blobs removed from containerd's content store and withdrawn", &c.removed);
        counter(r, "containerd_read_errors", "Reads of containerd's content store that failed", &c.read_errors);
        counter(r, "containerd_sent_bytes", "Bytes sent to peers from containerd's content store", &c.bytes_served);
        counter(r, "containerd_scan_errors", "Scans of containerd's content store that could not list it", &c.scan_errors);
        counter(r, "containerd_scan_truncated", "Entries of containerd's content store ignored past the per-scan bound", &c.scan_truncated);
        gauge(r, "containerd_blobs", "Blobs of containerd's content store advertised to peers", self.len() as i64);
    }
}

impl ContainerdContent {
    /// A source over `cfg.dir`, empty until [`ContainerdContent::scan`] runs.
    pub fn new(cfg: ContainerdConfig) -> Self {
        let blobs = cfg.dir.join("blobs").join("sha256");
        let slots = Semaphore::new(cfg.max_verifying.max(1));
        Self { cfg, blobs, state: Mutex::new(State::default()), slots, counters: Counters::default() }
    }

    /// Scans `cfg.dir` now and then every `scan_interval` (until the returned `Arc` is dropped).
    /// `None`, with an info log, when the directory does not exist: the node has no containerd,
    /// or it lives elsewhere; the feature is then off.
    pub async fn start(cfg: ContainerdConfig) -> Option<Arc<Self>> {
        if !cfg.dir.is_dir() {
            info!(dir = %cfg.dir.display(), "no containerd content directory; containerd's blobs are not shared with peers");
            return None;
        }
        let interval = cfg.scan_interval;
        let this = Arc::new(Self::new(cfg));
        if let Some(r) = rescan(Arc::downgrade(&this)).await {
            info!(dir = %this.cfg.dir.display(), blobs = r.blobs, "sharing containerd's blobs with peers");
        }
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if weak.strong_count() == 0 {
                    return;
                }
                rescan(weak.clone()).await;
            }
        });
        Some(this)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// The blobs to advertise as complete (those found by the last scan, minus withdrawn ones).
    pub fn digests(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = self.lock().present.keys().copied().collect();
        v.sort();
        v
    }

    /// How many blobs are advertised.
    pub fn len(&self) -> usize {
        self.lock().present.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many verified blobs have their piece hashes in memory.
    pub fn cached(&self) -> usize {
        self.lock().cache.len()
    }

    /// True if the last scan found `d` (it may still fail verification).
    pub fn contains(&self, d: &Digest) -> bool {
        self.lock().present.contains_key(d)
    }

    /// The manifest of `d` if it was verified and is still cached; does not start a verification.
    pub fn cached_manifest(&self, d: &Digest) -> Option<Arc<Manifest>> {
        let mut st = self.lock();
        if !st.present.contains_key(d) {
            return None;
        }
        st.cached(d).map(|(m, _)| m)
    }

    /// Starts verifying `d` in the background if it is present and not verified yet, so a later
    /// request finds it ready.
    pub fn prepare(self: &Arc<Self>, d: &Digest) {
        let _ = self.pending(d);
    }

    /// The manifest of `d` (size, piece size, blake3 of each piece), verifying the file's sha256
    /// and hashing its pieces first if that was not done yet (once, however many ask; the work
    /// continues if the caller gives up waiting).
    pub async fn manifest(self: &Arc<Self>, d: &Digest) -> Result<Arc<Manifest>, ContainerdError> {
        let mut rx = match self.pending(d)? {
            Ok(m) => return Ok(m),
            Err(rx) => rx,
        };
        let outcome = rx.wait_for(Option::is_some).await.map(|v| v.clone()).ok().flatten();
        match outcome {
            Some(Some(m)) => Ok(m),
            _ if self.lock().bad.contains_key(d) => Err(ContainerdError::Mismatch(*d)),
            _ => Err(ContainerdError::Changed { digest: *d, reason: "verification did not complete".into() }),
        }
    }

    /// Reads pieces `first..first+count` of a verified blob from containerd's file (pread at
    /// piece x piece size), each checked against its cached blake3. A file that vanished or
    /// changed since it was verified is withdrawn and the read fails, so the peer goes elsewhere.
    pub async fn read_pieces(self: &Arc<Self>, d: &Digest, first: u32, count: u32) -> Result<Vec<Vec<u8>>, ContainerdError> {
        let (m, id) = {
            let mut st = self.lock();
            if !st.present.contains_key(d) {
                return Err(ContainerdError::NotPresent(*d));
            }
            st.cached(d).ok_or(ContainerdError::Verifying(*d))?
        };
        let n = m.pieces.len();
        if count == 0 || first.checked_add(count).is_none_or(|end| end as usize > n) {
            return Err(ContainerdError::OutOfRange { digest: *d, first, count, pieces: n });
        }
        let path = self.blobs.join(d.hex());
        let digest = *d;
        let read = tokio::task::spawn_blocking(move || -> Result<Vec<Vec<u8>>, Verified> {
            let f = open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Verified::Changed("file vanished".into()),
                _ => Verified::Io(e),
            })?;
            let now = FileId::of(&f.metadata().map_err(Verified::Io)?);
            if now != id {
                return Err(Verified::Changed(format!("file replaced or modified (size {} -> {})", id.size, now.size)));
            }
            let ps = u64::from(m.piece_size);
            (first..first + count)
                .map(|i| {
                    let off = u64::from(i) * ps;
                    let mut buf = vec![0u8; (m.size - off).min(ps) as usize];
                    f.read_exact_at(&mut buf, off).map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => Verified::Changed("file shrank".into()),
                        _ => Verified::Io(e),
                    })?;
                    if blake3::hash(&buf) != m.pieces[i as usize] {
                        return Err(Verified::Mismatch(now));
                    }
                    Ok(buf)
                })
                .collect()
        })
        .await
        .unwrap_or_else(|e| Err(Verified::Io(std::io::Error::other(e))));
        match read {
            Ok(pieces) => {
                let bytes: usize = pieces.iter().map(Vec::len).sum();
                self.counters.bytes_served.fetch_add(bytes as u64, Ordering::Relaxed);
                Ok(pieces)
            }
            Err(v) => Err(self.failed(&digest, v)),
        }
    }

    /// Lists `blobs/sha256/` and replaces the advertised set with what is there. Blocking (run it
    /// on a blocking thread); [`ContainerdContent::start`] does so periodically.
    pub fn scan(&self) -> Result<ScanReport, ContainerdError> {
        let (known, bad) = {
            let st = self.lock();
            (st.present.clone(), st.bad.clone())
        };
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(r) => Some(r),
            // containerd not initialised yet, or its content wiped: nothing to share.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                self.counters.scan_errors.fetch_add(1, Ordering::Relaxed);
                let mut st = self.lock();
                let ds: Vec<Digest> = st.present.keys().copied().collect();
                for d in ds {
                    st.withdraw(&d);
                }
                return Err(ContainerdError::Io { context: format!("listing {}", self.blobs.display()), source });
            }
        };
        let mut found: HashMap<Digest, FileId> = HashMap::new();
        let mut still_bad: HashSet<Digest> = HashSet::new();
        let mut report = ScanReport::default();
        for (n, entry) in entries.into_iter().flatten().enumerate() {
            if n >= self.cfg.max_entries {
                report.truncated += 1;
                continue;
            }
            let Ok(entry) = entry else { continue };
            let Some(d) = entry.file_name().to_str().and_then(|h| format!("sha256:{h}").parse::<Digest>().ok()) else { continue };
            // A known file keeps its identity unless its inode changed (a rewrite in place is
            // caught when it is read: the size/mtime check and the per-piece blake3).
            let id = match known.get(&d) {
                Some(id) if id.ino == entry.ino() => *id,
                _ => match entry.metadata() {
                    // DirEntry::metadata does not follow symlinks: only regular files count.
                    Ok(m) if m.is_file() => FileId::of(&m),
                    _ => continue,
                },
            };
            if bad.get(&d) == Some(&id) {
                still_bad.insert(d);
                report.bad += 1;
                continue;
            }
            if id.size.div_ceil(u64::from(self.cfg.piece_size)) > u64::from(crate::store::MAX_PIECES) {
                continue;
            }
            found.insert(d, id);
        }
        if report.truncated > 0 {
            self.counters.scan_truncated.fetch_add(report.truncated as u64, Ordering::Relaxed);
        }
        let mut st = self.lock();
        let old: Vec<Digest> = st.present.keys().copied().collect();
        for d in old {
            match found.get(&d) {
                None => {
                    report.removed += 1;
                    st.withdraw(&d);
                }
                Some(id) if st.cache.get(&d).is_some_and(|c| c.id != *id) => st.uncache(&d),
                Some(_) => {}
            }
        }
        report.added = found.keys().filter(|d| !st.present.contains_key(*d)).count();
        report.blobs = found.len();
        st.present = found;
        st.bad.retain(|d, _| still_bad.contains(d));
        drop(st);
        self.counters.removed.fetch_add(report.removed as u64, Ordering::Relaxed);
        Ok(report)
    }

    // ---- internals ----

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached manifest, or a receiver for the verification of `d` (started if needed).
    fn pending(self: &Arc<Self>, d: &Digest) -> Result<Result<Arc<Manifest>, Pending>, ContainerdError> {
        let mut st = self.lock();
        if !st.present.contains_key(d) {
            return Err(if st.bad.contains_key(d) { ContainerdError::Mismatch(*d) } else { ContainerdError::NotPresent(*d) });
        }
        if let Some((m, _)) = st.cached(d) {
            return Ok(Ok(m));
        }
        if let Some(rx) = st.verifying.get(d) {
            return Ok(Err(rx.clone()));
        }
        let (tx, rx) = watch::channel(None);
        st.verifying.insert(*d, rx.clone());
        drop(st);
        let this = self.clone();
        let d = *d;
        tokio::spawn(async move {
            let mut started = std::time::Instant::now();
            let outcome = match this.slots.acquire().await {
                Ok(_permit) => {
                    started = std::time::Instant::now();
                    let (path, ps) = (this.blobs.join(d.hex()), this.cfg.piece_size);
                    tokio::task::spawn_blocking(move || verify(&path, &d, ps))
                        .await
                        .unwrap_or_else(|e| Verified::Io(std::io::Error::other(e)))
                }
                Err(_) => Verified::Changed("shutting down".into()),
            };
            let m = this.verified(&d, outcome, started.elapsed());
            this.lock().verifying.remove(&d);
            let _ = tx.send(Some(m));
        });
        Ok(Err(rx))
    }

    /// Records the outcome of a verification; the manifest if it succeeded.
    fn verified(&self, d: &Digest, outcome: Verified, took: Duration) -> Option<Arc<Manifest>> {
        match outcome {
            Verified::Ok(m, id) => {
                let m = Arc::new(m);
                let mut st = self.lock();
                // Removed by a scan meanwhile: containerd deleted it; do not bring it back.
                if !st.present.contains_key(d) {
                    return None;
                }
                st.present.insert(*d, id);
                st.insert(*d, m.clone(), id, self.cfg.max_cached_pieces);
                drop(st);
                self.counters.verified.fetch_add(1, Ordering::Relaxed);
                debug!(%d, size = m.size, elapsed_ms = took.as_millis() as u64, "verified a blob in containerd's content store");
                Some(m)
            }
            v => {
                self.failed(d, v);
                None
            }
        }
    }

    /// Withdraws `d` after a failed verification or read and counts why.
    fn failed(&self, d: &Digest, v: Verified) -> ContainerdError {
        let mut st = self.lock();
        st.withdraw(d);
        match v {
            Verified::Mismatch(id) => {
                st.bad.insert(*d, id);
                drop(st);
                self.counters.verify_failed.fetch_add(1, Ordering::Relaxed);
                warn!(%d, dir = %self.cfg.dir.display(), "a blob in containerd's content store does not match its digest; not serving it");
                ContainerdError::Mismatch(*d)
            }
            Verified::Changed(reason) => {
                drop(st);
                self.counters.changed.fetch_add(1, Ordering::Relaxed);
                info!(%d, %reason, "a blob in containerd's content store changed; withdrawn");
                ContainerdError::Changed { digest: *d, reason }
            }
            Verified::Io(source) => {
                drop(st);
                self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                warn!(%d, error = %source, "reading a blob in containerd's content store failed; withdrawn until the next scan");
                ContainerdError::Io { context: format!("reading {d} from containerd's content store"), source }
            }
            Verified::Ok(..) => ContainerdError::Verifying(*d),
        }
    }
}

/// One scan on a blocking thread; `None` if the source is gone (or the scan failed, logged).
async fn rescan(this: Weak<ContainerdContent>) -> Option<ScanReport> {
    let res = tokio::task::spawn_blocking(move || this.upgrade().map(|c| c.scan())).await.ok().flatten()?;
    match res {
        Ok(r) => {
            if r.added > 0 || r.removed > 0 {
                debug!(blobs = r.blobs, added = r.added, removed = r.removed, "containerd content scanned");
            }
            Some(r)
        }
        Err(e) => {
            warn!("containerd content scan: {e}; nothing from containerd is advertised until a scan succeeds");
            None
        }
    }
}

/// Opens a blob read-only without following symlinks (a link planted in containerd's directory
/// must not make us read another file).
fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Reads the file once: its sha256 against `d`, and the blake3 of each `piece_size` piece.
fn verify(path: &Path, d: &Digest, piece_size: u32) -> Verified {
    let f = match open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Verified::Changed("file vanished".into()),
        Err(e) => return Verified::Io(e),
    };
    let id = match f.metadata() {
        Ok(m) if m.is_file() => FileId::of(&m),
        Ok(_) => return Verified::Changed("not a regular file".into()),
        Err(e) => return Verified::Io(e),
    };
    let ps = u64::from(piece_size.max(1));
    let mut sha = sha2::Sha256::new();
    let mut pieces = Vec::with_capacity(id.size.div_ceil(ps) as usize);
    let mut buf = vec![0u8; ps.min(id.size) as usize];
    let mut off = 0u64;
    while off < id.size {
        let len = (id.size - off).min(ps) as usize;
        let b = &mut buf[..len];
        if let Err(e) = f.read_exact_at(b, off) {
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Verified::Changed("file shrank while being read".into()),
                _ => Verified::Io(e),
            };
        }
        sha.update(&*b);
        pieces.push(blake3::hash(b));
        off += len as u64;
    }
    match f.metadata() {
        Ok(m) if FileId::of(&m) == id => {}
        Ok(_) => return Verified::Changed("file modified while being read".into()),
        Err(e) => return Verified::Io(e),
    }
    if sha.finalize()[..] != d.as_bytes()[..] {
        return Verified::Mismatch(id);
    }
    Verified::Ok(Manifest { size: id.size, piece_size: piece_size.max(1), pieces }, id)
}

#[cfg(test)]
mod tests;
