//! The on-disk content store: every request that hits the cache goes through here.
//!
//! Blobs are addressed by their OCI sha256 digest and kept as fixed-size pieces with a bitmap of
//! which pieces are present, so a blob can be served (by range) while it is still being fetched
//! from peers. Nothing unverified is ever served:
//!
//! * Pieces from peers ([`Store::put_piece`]) carry an expected blake3 (from the peer's
//!   [`Manifest`]); a piece is checked before it is written and marked present. When the last
//!   piece lands the whole blob is checked against its sha256; on mismatch the blob is dropped
//!   and the error names the [`Source`]s that supplied it.
//! * Upstream downloads ([`Store::writer`]) have no manifest yet. The writer computes each
//!   piece's blake3 itself, which proves nothing about the bytes, so none of the pieces are
//!   readable until the whole-blob sha256 matches the digest; only then does the blob (and its
//!   manifest, for peers) become visible.
//!
//! Crash safety, eviction and the I/O path are described on [`Store`] and in `meta.rs`/`io.rs`.

mod digest;
mod io;
mod lru;
mod meta;
mod piece_map;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use sha2::Digest as _;
use tokio::sync::watch;

pub use digest::{Digest, DigestError};
pub use io::IoMode;
pub use writer::BlobWriter;

use io::{blocking, Io};
use lru::{Budget, Lru};
use meta::{piece_count, Layout, Meta};
use piece_map::PieceMap;

/// Default piece size: 1 MiB.
///
/// Per piece the store keeps one bit in the map and a 32-byte blake3 in the manifest (syncs and
/// metadata rewrites are batched per `sync_interval`), so small pieces cost overhead on
/// multi-GiB layers. Large pieces make peers re-fetch more after a failed piece, spread load across peers
/// more coarsely, and make a lazy range read (e.g. a 4 KiB header) wait for and verify a whole
/// piece. 1 MiB keeps a 10 GiB layer at 10k pieces (320 KiB manifest) while a piece still
/// transfers in milliseconds on a node network.
pub const PIECE_SIZE: u32 = 1 << 20;

/// Most pieces a blob exchanged between nodes may have (1 TiB at 1 MiB pieces): bounds the
/// manifest a peer may send us and the blobs of containerd's store we offer.
pub const MAX_PIECES: u32 = 1 << 20;

/// Who supplied bytes, so a verification failure can name the liar.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The origin registry (label: e.g. the registry host).
    Upstream(String),
    /// Another node (label: e.g. its address).
    Peer(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Upstream(s) => write!(f, "upstream {s}"),
            Source::Peer(s) => write!(f, "peer {s}"),
        }
    }
}

fn list_sources(s: &[Source]) -> String {
    if s.is_empty() {
        return "unknown sources (pieces written before a restart)".into();
    }
    s.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Errors at the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    InvalidDigest(#[from] DigestError),
    #[error("blob {0} is not in the store")]
    NotFound(Digest),
    #[error("blob {0} is already stored or being written")]
    Exists(Digest),
    #[error("blob {0} is in use (pinned) and cannot be removed")]
    Pinned(Digest),
    #[error("blob {0} was dropped (removed, evicted or failed verification) while in use")]
    Dropped(Digest),
    #[error("blob {digest}: piece {index} from {from} does not match its expected blake3; rejected")]
    PieceMismatch { digest: Digest, index: usize, from: Source },
    #[error("blob {digest}: content does not match its sha256 digest; blob dropped; bytes came from {}", list_sources(.from))]
    DigestMismatch { digest: Digest, from: Vec<Source> },
    #[error("blob {digest}: bad piece {index}: {reason}")]
    BadPiece { digest: Digest, index: usize, reason: String },
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch { digest: Digest, expected: u64, actual: u64 },
    #[error("blob {digest}: range {offset}+{len} is outside its {size} bytes")]
    OutOfRange { digest: Digest, offset: u64, len: u64, size: u64 },
    #[error("blob {digest} ({size} bytes) is larger than the store budget ({budget} bytes)")]
    TooLarge { digest: Digest, size: u64, budget: u64 },
    #[error("no room for blob {digest} ({size} bytes): {used} bytes used, {pinned} of them pinned")]
    NoRoom { digest: Digest, size: u64, used: u64, pinned: u64 },
    /// ENOSPC/EDQUOT: the blob being written is abandoned (its files deleted) and an eviction
    /// pass runs; blobs already stored are untouched. Usually means the budget exceeds the disk.
    #[error("disk full while writing blob {digest}; the write was abandoned")]
    NoSpace { digest: Digest, source: std::io::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// Result alias for the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn io_error(d: &Digest, context: &str, e: std::io::Error) -> StoreError {
    if is_no_space(&e) {
        StoreError::NoSpace { digest: *d, source: e }
    } else {
        StoreError::Io { context: format!("{context} ({d})"), source: e }
    }
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Bytes the store may use (complete and partial blobs, by their full size).
    pub budget_bytes: u64,
    /// Fraction of the budget at which eviction starts (default 0.9).
    pub high_watermark: f64,
    /// Fraction of the budget eviction frees down to (default 0.8).
    pub low_watermark: f64,
    /// Piece size for new blobs (default [`PIECE_SIZE`]); existing blobs keep theirs.
    pub piece_size: u32,
    /// I/O backend selection.
    pub io: IoMode,
    /// Re-check each piece's blake3 on every read. Off by default: pieces were verified before
    /// they were fdatasync'ed, and checking on read turns a small range read into a whole-piece
    /// read plus a hash. Turn on where the disk is not trusted to return what it stored.
    pub verify_reads: bool,
    /// How long a piece from `put_piece` may be readable before the metadata lists it durably.
    /// Pieces landing within this window share one fdatasync and one metadata rewrite (a crash
    /// loses at most this much work: those pieces are fetched again). Zero: every piece is
    /// synced and recorded before `put_piece` returns. A completed blob is always durable
    /// before it is marked complete.
    pub sync_interval: std::time::Duration,
}

impl StoreConfig {
    /// Defaults with the given budget.
    pub fn new(budget_bytes: u64) -> Self {
        StoreConfig {
            budget_bytes,
            high_watermark: 0.9,
            low_watermark: 0.8,
            piece_size: PIECE_SIZE,
            io: IoMode::Auto,
            verify_reads: false,
            sync_interval: std::time::Duration::from_millis(500),
        }
    }
}

/// Piece layout and hashes of a verified blob; peers use it to check pieces they fetch from us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub piece_size: u32,
    pub pieces: Vec<blake3::Hash>,
}

/// What [`Store::put_piece`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Verified and readable; durable (listed in the metadata) within the store's
    /// `sync_interval`.
    Stored,
    /// Stored, and it was the last piece: the whole blob matched its sha256.
    Completed,
    /// Already present; nothing written.
    AlreadyPresent,
    /// Another writer holds this piece right now; nothing written. Use [`Store::wait_piece`].
    InFlight,
}

/// One blob as listed by [`Store::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    pub complete: bool,
    pub pieces_present: usize,
    pub pieces_total: usize,
}

/// Counters for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    pub blobs: usize,
    pub complete_blobs: usize,
    pub used_bytes: u64,
    pub budget_bytes: u64,
    pub evictions: u64,
    pub io_backend: &'static str,
}

/// Locks a std mutex, ignoring poisoning: every critical section leaves the state consistent
/// before anything that could panic, so a panic elsewhere must not take the cache down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// In-memory state of one blob.
pub(crate) struct Blob {
    digest: Digest,
    /// Unique per blob ever created in this process: a blob dropped and declared again is a
    /// different instance (see [`Store::instance`]).
    instance: u64,
    size: u64,
    piece_size: u32,
    file: Arc<File>,
    state: Mutex<BlobState>,
    /// Serialises metadata rewrites so each one includes every piece made durable before it;
    /// held by `forget` while the files go, so no rewrite lands after (or recreates) them.
    meta_lock: tokio::sync::Mutex<()>,
    /// A deferred metadata flush is scheduled (pieces readable but not yet recorded).
    flush_pending: std::sync::atomic::AtomicBool,
    /// The sha256 of the contiguous prefix of present pieces, advanced as pieces land, so the
    /// check after the last piece only hashes what is left instead of re-reading the blob.
    sha: Arc<tokio::sync::Mutex<ShaPrefix>>,
    /// Set when pieces landed that the prefix hasher may not have seen yet.
    sha_wanted: std::sync::atomic::AtomicBool,
    /// Bumped whenever pieces become readable or the blob is dropped; waiting readers wake on it.
    changed: watch::Sender<u64>,
}

struct BlobState {
    /// Being written by an upstream [`BlobWriter`]: nothing readable until it finishes.
    streaming: bool,
    /// Verified and written pieces (the only ones ever read); durable once the metadata lists them.
    present: PieceMap,
    /// Pieces some `put_piece` call is writing right now.
    claimed: PieceMap,
    hashes: Vec<Option<blake3::Hash>>,
    sources: Vec<Option<Source>>,
    complete: bool,
    dropped: bool,
}

impl Blob {
    fn new(digest: Digest, size: u64, piece_size: u32, file: File, streaming: bool) -> Arc<Blob> {
        let n = piece_count(size, piece_size);
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Arc::new(Blob {
            digest,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            size,
            piece_size,
            file: Arc::new(file),
            state: Mutex::new(BlobState {
                streaming,
                present: PieceMap::new(n),
                claimed: PieceMap::new(n),
                hashes: vec![None; n],
                sources: vec![None; n],
                complete: false,
                dropped: false,
            }),
            meta_lock: tokio::sync::Mutex::new(()),
            flush_pending: std::sync::atomic::AtomicBool::new(false),
            sha: Arc::new(tokio::sync::Mutex::new(ShaPrefix { hasher: sha2::Sha256::new(), next: 0, from_memory: 0, from_file: 0 })),
            sha_wanted: std::sync::atomic::AtomicBool::new(false),
            changed: watch::channel(0).0,
        })
    }

    fn pieces(&self) -> usize {
        piece_count(self.size, self.piece_size)
    }

    fn piece_offset(&self, i: usize) -> u64 {
        i as u64 * u64::from(self.piece_size)
    }

    fn piece_len(&self, i: usize) -> usize {
        (self.size - self.piece_offset(i)).min(u64::from(self.piece_size)) as usize
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Metadata listing the present pieces (the caller syncs the data before persisting it).
    fn meta_snapshot(&self, st: &BlobState) -> Meta {
        let pieces: Vec<Option<blake3::Hash>> =
            (0..self.pieces()).map(|i| if st.present.get(i) { st.hashes[i] } else { None }).collect();
        Meta { size: self.size, piece_size: self.piece_size, complete: st.complete, pieces }
    }
}

/// Running sha256 over pieces `0..next` of a blob.
struct ShaPrefix {
    hasher: sha2::Sha256,
    next: usize,
    /// Pieces hashed from memory (just written, or still among the recent pieces) and read back
    /// from the file: the second costs a copy out of the page cache per byte (logged at the end).
    from_memory: usize,
    from_file: usize,
}

struct Index {
    blobs: HashMap<Digest, Arc<Blob>>,
    lru: Lru,
}

pub(crate) struct Inner {
    layout: Layout,
    cfg: StoreConfig,
    budget: Budget,
    io: Io,
    index: Mutex<Index>,
    /// Held while files appear in or disappear from `blobs/` (create, finish, remove, evict), so
    /// a blob being created can never race with the deletion of an earlier blob of the same
    /// digest. Never held across piece data I/O.
    namespace: tokio::sync::Mutex<()>,
    evictions: AtomicU64,
    /// Bumped whenever what the node can advertise changes (a blob completes, gets its first
    /// readable piece, or leaves the store): gossip re-advertises at once instead of at its next
    /// periodic scan.
    content: watch::Sender<u64>,
    /// The pieces `put_piece` wrote last, in memory: peers ask for fresh pieces soon after they
    /// land, and these are served without reading them back from the page cache. Keyed by the
    /// blob incarnation (a digest dropped and declared again may have had other pieces).
    recent: Mutex<std::collections::VecDeque<(std::sync::Weak<Blob>, usize, Bytes)>>,
}

/// Pieces kept in [`Inner::recent`] (1 MiB each by default).
const RECENT_PIECES: usize = 32;

/// Keeps a blob from being evicted or removed while it is read or written.
pub struct PinGuard {
    inner: Arc<Inner>,
    blob: Arc<Blob>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut idx = lock(&self.inner.index);
        // Only unpin the incarnation we pinned (the digest may have been dropped and re-added).
        if idx.blobs.get(&self.blob.digest).is_some_and(|b| Arc::ptr_eq(b, &self.blob)) {
            idx.lru.unpin(&self.blob.digest);
        }
    }
}

/// The content store. Cheap to clone; all clones share one index and one I/O thread.
///
/// Crash safety: piece data is fdatasync'ed before the metadata that lists it is replaced
/// (write temp, fsync, rename, fsync dir), so after a SIGKILL or power loss every piece the
/// metadata calls present is on disk. Upstream downloads live in `tmp/` until verified and are
/// renamed into place before their metadata is written. [`Store::open`] deletes `tmp/`, orphan
/// data files and damaged metadata, and rebuilds the index from what is left.
///
/// Capacity: every blob reserves its full size when created. When a reservation would take usage
/// over the high watermark, least recently used unpinned blobs are evicted down to the low
/// watermark. Blobs being read or written are pinned ([`PinGuard`]) and never evicted.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (creating if needed) the store at `dir`, cleans up after any crash, rebuilds the
    /// index, picks the I/O backend and evicts if the budget shrank.
    pub async fn open(dir: impl AsRef<Path>, cfg: StoreConfig) -> Result<Store> {
        let layout = Layout::new(dir.as_ref());
        let scan_layout = layout.clone();
        let found = blocking(move || scan(&scan_layout))
            .await
            .map_err(|e| StoreError::Io { context: format!("scanning {}", layout.blobs.display()), source: e })?;
        let budget = Budget::new(cfg.budget_bytes, cfg.high_watermark, cfg.low_watermark);
        let io = Io::start(cfg.io);
        let mut index = Index { blobs: HashMap::new(), lru: Lru::default() };
        let mut unverified = Vec::new();
        for (digest, m, file) in found {
            let blob = Blob::new(digest, m.size, m.piece_size, file, false);
            {
                let mut st = lock(&blob.state);
                for (i, h) in m.pieces.iter().enumerate() {
                    if let Some(h) = h {
                        st.present.set(i);
                        st.hashes[i] = Some(*h);
                    }
                }
                st.complete = m.complete;
                if !m.complete && st.present.is_complete() {
                    unverified.push(blob.clone());
                }
            }
            index.lru.insert(digest, m.size);
            index.blobs.insert(digest, blob);
        }
        let store = Store {
            inner: Arc::new(Inner {
                layout,
                cfg,
                budget,
                io,
                index: Mutex::new(index),
                namespace: tokio::sync::Mutex::new(()),
                evictions: AtomicU64::new(0),
                content: watch::channel(0).0,
                recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_PIECES)),
            }),
        };
        // All pieces landed but the crash hit before the sha256 check: finish it now.
        for blob in unverified {
            let _pin = store.pin_blob(&blob);
            if let Err(e) = store.complete_pieces(&blob, None).await {
                tracing::warn!(digest = %blob.digest, error = %e, "dropping blob that failed verification at startup");
            }
        }
        {
            let ns = store.inner.namespace.lock().await;
            store.evict(&ns, 0).await.ok();
        }
        let s = store.stats();
        tracing::info!(dir = %dir.as_ref().display(), blobs = s.blobs, used = s.used_bytes,
            budget = s.budget_bytes, io = s.io_backend, "content store opened");
        Ok(store)
    }

    /// True if the blob is complete and verified.
    pub fn has(&self, d: &Digest) -> bool {
        self.get(d).is_some_and(|b| lock(&b.state).complete)
    }

    /// Pins a blob against eviction and removal for as long as the guard lives.
    pub fn pin(&self, d: &Digest) -> Option<PinGuard> {
        let mut idx = lock(&self.inner.index);
        let blob = idx.blobs.get(d)?.clone();
        idx.lru.pin(d);
        Some(PinGuard { inner: self.inner.clone(), blob })
    }

    /// The size of a blob `manifest` would describe (complete, every piece hash known), without
    /// copying its hashes: callers that only ask "is it here, how big" (some under a lock).
    pub fn complete_size(&self, d: &Digest) -> Option<u64> {
        let b = self.get(d)?;
        let st = lock(&b.state);
        (st.complete && st.hashes.iter().all(Option::is_some)).then_some(b.size)
    }

    /// Piece hashes of a complete blob (partial blobs have no end-to-end verified manifest).
    pub fn manifest(&self, d: &Digest) -> Option<Manifest> {
        let b = self.get(d)?;
        let st = lock(&b.state);
        if !st.complete {
            return None;
        }
        let pieces = st.hashes.iter().copied().collect::<Option<Vec<_>>>()?;
        Some(Manifest { size: b.size, piece_size: b.piece_size, pieces })
    }

    /// Size, piece size and the blake3 of each present piece of a blob filled piece by piece
    /// (`declare` + `put_piece`), complete or not; peers use it as a partial manifest.
    pub fn known_hashes(&self, d: &Digest) -> Option<(u64, u32, Vec<Option<blake3::Hash>>)> {
        let b = self.get(d)?;
        let st = lock(&b.state);
        if st.streaming || st.dropped {
            return None;
        }
        let hashes = (0..b.pieces()).map(|i| if st.present.get(i) { st.hashes[i] } else { None }).collect();
        Some((b.size, b.piece_size, hashes))
    }

    /// Whether `d` is incomplete and its pieces so far came from upstream: this node is the
    /// blob's origin for its peers (they get it from here, or from each other).
    pub fn arriving_from_upstream(&self, d: &Digest) -> bool {
        self.get(d).is_some_and(|b| {
            let st = lock(&b.state);
            !st.complete && !st.dropped && st.sources.iter().flatten().any(|s| matches!(s, Source::Upstream(_)))
        })
    }

    /// Changes whenever a blob completes, gets its first readable piece, or leaves the store
    /// (see [`Store::list`] for the new state).
    pub fn watch_content(&self) -> watch::Receiver<u64> {
        self.inner.content.subscribe()
    }

    pub(crate) fn content_changed(&self) {
        self.inner.content.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Which instance of `d` the store holds now. Pieces of one instance never change once
    /// readable, so a reader that finds the same instance after each read knows every byte it
    /// read belongs to it, even if the blob was dropped (digest mismatch) and declared again.
    pub fn instance(&self, d: &Digest) -> Option<u64> {
        self.get(d).map(|b| b.instance)
    }

    /// Piece size of blobs this store creates (peers must use the same to exchange pieces).
    pub fn piece_size(&self) -> u32 {
        self.inner.cfg.piece_size
    }

    /// Which pieces are readable (verified and written), for blobs filled piece by piece from
    /// peers and for complete ones; peers use it to swarm on a blob still being downloaded.
    /// `None` for unknown blobs and for upstream downloads in progress (unverified until done).
    pub fn present_pieces(&self, d: &Digest) -> Option<Vec<bool>> {
        let b = self.get(d)?;
        let st = lock(&b.state);
        if st.streaming || st.dropped {
            return None;
        }
        Some((0..b.pieces()).map(|i| st.present.get(i)).collect())
    }

    /// Which present pieces of `d` came from upstream (their blake3 computed here, not checked
    /// against anyone's): the pieces only this node can give out while the blob arrives.
    pub fn upstream_pieces(&self, d: &Digest) -> Option<Vec<bool>> {
        let b = self.get(d)?;
        let st = lock(&b.state);
        if st.streaming || st.dropped {
            return None;
        }
        Some((0..b.pieces()).map(|i| st.present.get(i) && matches!(st.sources.get(i), Some(Some(Source::Upstream(_))))).collect())
    }

    /// Path of a complete blob's data file, for zero-copy serving (sendfile/splice). The blob
    /// occupies bytes `[0, size)` of the file. Pin the blob while serving from the path:
    /// eviction unlinks the file (an fd opened before that stays valid).
    pub fn blob_file_path(&self, d: &Digest) -> Option<PathBuf> {
        self.has(d).then(|| self.inner.layout.data(d))
    }

    /// All blobs, complete and partial.
    pub fn list(&self) -> Vec<BlobInfo> {
        let blobs: Vec<Arc<Blob>> = lock(&self.inner.index).blobs.values().cloned().collect();
        let mut out: Vec<BlobInfo> = blobs
            .iter()
            .map(|b| {
                let st = lock(&b.state);
                BlobInfo {
                    digest: b.digest,
                    size: b.size,
                    complete: st.complete,
                    pieces_present: st.present.count(),
                    pieces_total: st.present.len(),
                }
            })
            .collect();
        out.sort_by_key(|i| i.digest);
        out
    }

    /// Counters for metrics and logs.
    pub fn stats(&self) -> StoreStats {
        let blobs: Vec<Arc<Blob>> = lock(&self.inner.index).blobs.values().cloned().collect();
        let used = lock(&self.inner.index).lru.used();
        StoreStats {
            blobs: blobs.len(),
            complete_blobs: blobs.iter().filter(|b| lock(&b.state).complete).count(),
            used_bytes: used,
            budget_bytes: self.inner.budget.total,
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            io_backend: self.inner.io.name(),
        }
    }

    /// Registers a blob whose pieces will arrive via [`Store::put_piece`] (piece size from the
    /// config). Idempotent for the same size. Reserves `size` bytes, evicting if needed.
    pub async fn declare(&self, d: &Digest, size: u64) -> Result<()> {
        let ns = self.inner.namespace.lock().await;
        if let Some(b) = self.get(d) {
            return if b.size == size {
                Ok(())
            } else {
                Err(StoreError::SizeMismatch { digest: *d, expected: b.size, actual: size })
            };
        }
        let piece_size = self.inner.cfg.piece_size;
        self.reserve(&ns, d, size).await?;
        let (layout, dd) = (self.inner.layout.clone(), *d);
        let created = blocking(move || {
            let path = layout.data(&dd);
            let res = (|| {
                let f = create_file(&path, size)?;
                f.sync_all()?;
                meta::sync_dir(&layout.blobs)?;
                let m = Meta { size, piece_size, complete: false, pieces: vec![None; piece_count(size, piece_size)] };
                meta::write_meta(&layout, &dd, &m)?;
                Ok(f)
            })();
            if res.is_err() {
                let _ = meta::remove_blob_files(&layout, &dd);
            }
            res
        })
        .await;
        let file = match created {
            Ok(f) => f,
            Err(e) => {
                lock(&self.inner.index).lru.remove(d);
                let err = io_error(d, "creating blob", e);
                if matches!(err, StoreError::NoSpace { .. }) {
                    self.evict(&ns, 0).await.ok();
                }
                return Err(err);
            }
        };
        let blob = Blob::new(*d, size, piece_size, file, false);
        lock(&self.inner.index).blobs.insert(*d, blob.clone());
        drop(ns);
        if blob.pieces() == 0 {
            let _pin = self.pin_blob(&blob);
            self.complete_pieces(&blob, None).await?;
        }
        Ok(())
    }

    /// Stores piece `index` of a declared blob after checking it against `expected` (the blake3
    /// from the peer's manifest). The piece is readable once written and durable within `sync_interval` (at once if zero). The last piece
    /// triggers the whole-blob sha256 check; on mismatch the blob is dropped and
    /// [`StoreError::DigestMismatch`] names the sources.
    pub async fn put_piece(
        &self,
        d: &Digest,
        index: usize,
        bytes: Vec<u8>,
        expected: blake3::Hash,
        source: Source,
    ) -> Result<PutOutcome> {
        let (blob, _pin) = self.get_pinned(d)?;
        if index >= blob.pieces() {
            return Err(StoreError::BadPiece { digest: *d, index, reason: format!("blob has {} pieces", blob.pieces()) });
        }
        if bytes.len() != blob.piece_len(index) {
            return Err(StoreError::BadPiece {
                digest: *d,
                index,
                reason: format!("{} bytes, expected {}", bytes.len(), blob.piece_len(index)),
            });
        }
        if blake3::hash(&bytes) != expected {
            tracing::warn!(digest = %d, index, %source, "piece failed blake3 verification");
            return Err(StoreError::PieceMismatch { digest: *d, index, from: source });
        }
        {
            let mut st = lock(&blob.state);
            if st.dropped {
                return Err(StoreError::Dropped(*d));
            }
            if st.streaming {
                return Err(StoreError::Exists(*d));
            }
            if st.present.get(index) {
                return Ok(PutOutcome::AlreadyPresent);
            }
            if !st.claimed.set(index) {
                return Ok(PutOutcome::InFlight);
            }
        }
        let claim = Claim { blob: &blob, index };
        let bytes = match self.inner.io.write_at(&blob.file, blob.piece_offset(index), bytes).await {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                let err = io_error(d, "writing piece", e);
                if matches!(err, StoreError::NoSpace { .. }) {
                    let ns = self.inner.namespace.lock().await;
                    self.evict(&ns, 0).await.ok();
                }
                return Err(err);
            }
        };
        // Readable now (verified, in the page cache); durable with the next metadata flush,
        // which syncs the data before it lists the piece. A crash before that only forgets it.
        let complete = {
            let mut st = lock(&blob.state);
            if st.dropped {
                return Err(StoreError::Dropped(*d));
            }
            let first = st.present.count() == 0;
            st.present.set(index);
            st.hashes[index] = Some(expected);
            st.sources[index] = Some(source);
            blob.notify();
            if first {
                self.content_changed();
            }
            st.present.is_complete()
        };
        drop(claim);
        {
            let mut recent = lock(&self.inner.recent);
            if recent.len() >= RECENT_PIECES {
                recent.pop_front();
            }
            recent.push_back((Arc::downgrade(&blob), index, bytes.clone()));
        }
        if complete {
            self.complete_pieces(&blob, Some((index, bytes))).await?;
            return Ok(PutOutcome::Completed);
        }
        self.advance_sha(&blob, Some((index, bytes)));
        let interval = self.inner.cfg.sync_interval;
        if interval.is_zero() {
            self.flush_meta(&blob).await?;
        } else if !blob.flush_pending.swap(true, Ordering::SeqCst) {
            // Weak: a store that was closed meanwhile writes nothing more (like a crash: those
            // pieces are fetched again), so a directory never gets writes from a closed store.
            let (store, blob) = (Arc::downgrade(&self.inner), blob.clone());
            tokio::spawn(async move {
                tokio::time::sleep(interval).await;
                let Some(inner) = store.upgrade() else { return };
                let store = Store { inner };
                // Cleared before the snapshot: a piece landing after this schedules the next
                // flush, one landing before is in this one.
                blob.flush_pending.store(false, Ordering::SeqCst);
                match store.flush_meta(&blob).await {
                    Ok(()) | Err(StoreError::Dropped(_)) => {}
                    Err(e) => tracing::warn!(digest = %blob.digest, error = %e, "could not record pieces durably"),
                }
            });
        }
        Ok(PutOutcome::Stored)
    }

    /// Starts an upstream download of `size` bytes. Nothing is readable until
    /// [`BlobWriter::finish`] has checked the sha256. Dropping the writer abandons the download.
    pub async fn writer(&self, d: &Digest, size: u64, source: Source) -> Result<BlobWriter> {
        let ns = self.inner.namespace.lock().await;
        if self.get(d).is_some() {
            return Err(StoreError::Exists(*d));
        }
        self.reserve(&ns, d, size).await?;
        let tmp = self.inner.layout.temp(d, "partial");
        let tmp2 = tmp.clone();
        let created = blocking(move || {
            create_file(&tmp2, size).inspect_err(|_| {
                let _ = fs::remove_file(&tmp2);
            })
        })
        .await;
        let file = match created {
            Ok(f) => f,
            Err(e) => {
                lock(&self.inner.index).lru.remove(d);
                let err = io_error(d, "creating download file", e);
                if matches!(err, StoreError::NoSpace { .. }) {
                    self.evict(&ns, 0).await.ok();
                }
                return Err(err);
            }
        };
        let blob = Blob::new(*d, size, self.inner.cfg.piece_size, file, true);
        let pin = {
            let mut idx = lock(&self.inner.index);
            idx.blobs.insert(*d, blob.clone());
            idx.lru.pin(d);
            PinGuard { inner: self.inner.clone(), blob: blob.clone() }
        };
        Ok(BlobWriter::new(self.clone(), blob, tmp, source, pin))
    }

    /// Reads `len` bytes at `offset` into memory, waiting until the pieces covering the range
    /// are present. Meant for piece-sized reads; serve whole blobs with [`Store::blob_file_path`].
    /// Fails if the blob is unknown or gets dropped while waiting; wrap in a timeout to bound
    /// the wait.
    pub async fn read_range(&self, d: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        let (blob, _pin) = self.get_pinned(d)?;
        if offset.checked_add(len).is_none_or(|end| end > blob.size) {
            return Err(StoreError::OutOfRange { digest: *d, offset, len, size: blob.size });
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let ps = u64::from(blob.piece_size);
        let (first, last) = ((offset / ps) as usize, ((offset + len - 1) / ps) as usize);
        wait_pieces(&blob, first..last + 1).await?;
        lock(&self.inner.index).lru.touch(d);
        let io = &self.inner.io;
        let err = |e| io_error(d, "reading blob", e);
        if !self.inner.cfg.verify_reads {
            return io.read_at(&blob.file, offset, len as usize).await.map_err(err);
        }
        let mut out = Vec::with_capacity(len as usize);
        for i in first..=last {
            let piece = io.read_at(&blob.file, blob.piece_offset(i), blob.piece_len(i)).await.map_err(err)?;
            let want = lock(&blob.state).hashes[i];
            if want != Some(blake3::hash(&piece)) {
                tracing::error!(digest = %d, index = i, "stored piece is corrupt on disk");
                return Err(StoreError::Io {
                    context: format!("piece {i} of {d} is corrupt on disk"),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                });
            }
            let start = offset.max(blob.piece_offset(i)) - blob.piece_offset(i);
            let end = (offset + len).min(blob.piece_offset(i) + ps) - blob.piece_offset(i);
            out.extend_from_slice(&piece[start as usize..end as usize]);
        }
        Ok(out)
    }

    /// Piece `index` of `d`, waiting until it is present: from memory if it landed recently
    /// (verified before it was written), else read like [`Store::read_range`].
    pub async fn read_piece(&self, d: &Digest, index: usize) -> Result<Bytes> {
        let (blob, _pin) = self.get_pinned(d)?;
        if index >= blob.pieces() {
            return Err(StoreError::BadPiece { digest: *d, index, reason: format!("blob has {} pieces", blob.pieces()) });
        }
        wait_pieces(&blob, index..index + 1).await?;
        if let Some(bytes) = self.recent_piece(&blob, index) {
            lock(&self.inner.index).lru.touch(d);
            return Ok(bytes);
        }
        self.read_range(d, blob.piece_offset(index), blob.piece_len(index) as u64).await.map(Bytes::from)
    }

    /// Waits until piece `index` is readable.
    pub async fn wait_piece(&self, d: &Digest, index: usize) -> Result<()> {
        let (blob, _pin) = self.get_pinned(d)?;
        if index >= blob.pieces() {
            return Err(StoreError::BadPiece { digest: *d, index, reason: format!("blob has {} pieces", blob.pieces()) });
        }
        wait_pieces(&blob, index..index + 1).await
    }

    /// Drops an incomplete blob whose pieces all came from upstream (an upstream body that
    /// failed), even while pinned: its readers fail, and the next fetch starts from a new blob
    /// instead of mixing in this body's pieces. A blob that also holds pieces from peers is
    /// left to the download that brought them. True if dropped.
    pub async fn abandon_upstream(&self, d: &Digest) -> bool {
        let Some(blob) = self.get(d) else { return false };
        {
            let st = lock(&blob.state);
            if st.complete || st.sources.iter().flatten().any(|s| !matches!(s, Source::Upstream(_))) {
                return false;
            }
        }
        self.drop_blob(&blob).await;
        true
    }

    /// Deletes a blob. Fails with [`StoreError::Pinned`] while it is in use.
    pub async fn remove(&self, d: &Digest) -> Result<bool> {
        let _ns = self.inner.namespace.lock().await;
        let blob = {
            let mut idx = lock(&self.inner.index);
            if idx.lru.is_pinned(d) {
                return Err(StoreError::Pinned(*d));
            }
            let Some(blob) = idx.blobs.remove(d) else { return Ok(false) };
            idx.lru.remove(d);
            blob
        };
        self.forget(&blob).await;
        Ok(true)
    }

    // ---- internals ----

    /// Piece `index` of this incarnation of `blob` if it is among the recently written pieces.
    fn recent_piece(&self, blob: &Blob, index: usize) -> Option<Bytes> {
        lock(&self.inner.recent)
            .iter()
            .rev()
            .find(|(b, i, _)| *i == index && std::ptr::eq(b.as_ptr(), blob))
            .map(|(_, _, bytes)| bytes.clone())
    }

    fn get(&self, d: &Digest) -> Option<Arc<Blob>> {
        lock(&self.inner.index).blobs.get(d).cloned()
    }

    fn get_pinned(&self, d: &Digest) -> Result<(Arc<Blob>, PinGuard)> {
        self.pin(d).map(|p| (p.blob.clone(), p)).ok_or(StoreError::NotFound(*d))
    }

    fn pin_blob(&self, blob: &Arc<Blob>) -> PinGuard {
        lock(&self.inner.index).lru.pin(&blob.digest);
        PinGuard { inner: self.inner.clone(), blob: blob.clone() }
    }

    /// Makes room for and reserves `size` bytes for `d` (caller holds the namespace lock).
    async fn reserve(&self, ns: &tokio::sync::MutexGuard<'_, ()>, d: &Digest, size: u64) -> Result<()> {
        if size > self.inner.budget.total {
            return Err(StoreError::TooLarge { digest: *d, size, budget: self.inner.budget.total });
        }
        self.evict(ns, size).await.map_err(|e| match e {
            StoreError::NoRoom { used, pinned, .. } => StoreError::NoRoom { digest: *d, size, used, pinned },
            e => e,
        })?;
        lock(&self.inner.index).lru.insert(*d, size);
        Ok(())
    }

    /// Evicts so that `incoming` more bytes fit (see [`Lru::plan_eviction`]). Victims leave the
    /// index under the index lock, so nobody can pin them afterwards; their files go after.
    async fn evict(&self, _ns: &tokio::sync::MutexGuard<'_, ()>, incoming: u64) -> Result<()> {
        let victims: Vec<Arc<Blob>> = {
            let mut idx = lock(&self.inner.index);
            let plan = idx.lru.plan_eviction(incoming, self.inner.budget).map_err(|e| StoreError::NoRoom {
                digest: Digest::from_sha256_bytes([0; 32]),
                size: incoming,
                used: e.used,
                pinned: e.pinned,
            })?;
            plan.iter()
                .filter_map(|d| {
                    idx.lru.remove(d);
                    idx.blobs.remove(d)
                })
                .collect()
        };
        for blob in victims {
            tracing::info!(digest = %blob.digest, size = blob.size, "evicting blob");
            self.inner.evictions.fetch_add(1, Ordering::Relaxed);
            self.forget(&blob).await;
        }
        Ok(())
    }

    /// Marks an already-unindexed blob dropped, wakes its waiters and deletes its files
    /// (caller holds the namespace lock).
    async fn forget(&self, blob: &Arc<Blob>) {
        lock(&blob.state).dropped = true;
        blob.notify();
        self.content_changed();
        lock(&self.inner.recent).retain(|(b, _, _)| b.strong_count() > 0 && !std::ptr::eq(b.as_ptr(), Arc::as_ptr(blob)));
        // A metadata rewrite in progress finishes first; later ones see `dropped`.
        let _m = blob.meta_lock.lock().await;
        let (layout, d) = (self.inner.layout.clone(), blob.digest);
        if let Err(e) = blocking(move || meta::remove_blob_files(&layout, &d)).await {
            tracing::warn!(digest = %blob.digest, error = %e, "failed to delete blob files");
        }
    }

    /// Drops a blob from the index (if it is still this incarnation) and deletes its files.
    async fn drop_blob(&self, blob: &Arc<Blob>) {
        let _ns = self.inner.namespace.lock().await;
        {
            let mut idx = lock(&self.inner.index);
            if idx.blobs.get(&blob.digest).is_some_and(|b| Arc::ptr_eq(b, blob)) {
                idx.blobs.remove(&blob.digest);
                idx.lru.remove(&blob.digest);
            }
        }
        self.forget(blob).await;
    }

    async fn persist_meta(&self, blob: &Blob, m: Meta) -> Result<()> {
        let (layout, d) = (self.inner.layout.clone(), blob.digest);
        blocking(move || meta::write_meta(&layout, &d, &m)).await.map_err(|e| io_error(&d, "writing metadata", e))
    }

    /// Syncs the data file and rewrites the metadata to list every piece present before the
    /// sync (those pieces' writes had completed, so the sync covers them).
    async fn flush_meta(&self, blob: &Arc<Blob>) -> Result<()> {
        let _m = blob.meta_lock.lock().await;
        let meta = {
            let st = lock(&blob.state);
            if st.dropped {
                return Err(StoreError::Dropped(blob.digest));
            }
            if st.complete {
                // Completion wrote the final record.
                return Ok(());
            }
            blob.meta_snapshot(&st)
        };
        self.inner.io.sync_data(&blob.file).await.map_err(|e| io_error(&blob.digest, "syncing pieces", e))?;
        self.persist_meta(blob, meta).await
    }

    /// Lets the prefix hasher take in newly present pieces, off the caller's path: if it is
    /// idle, a task hashes from its position as far as pieces are present (`piece`, just
    /// written, from memory; the others from the file); if it is busy it goes on afterwards.
    fn advance_sha(&self, blob: &Arc<Blob>, piece: Option<(usize, Bytes)>) {
        blob.sha_wanted.store(true, Ordering::SeqCst);
        let Ok(guard) = blob.sha.clone().try_lock_owned() else { return };
        let (store, blob) = (self.clone(), blob.clone());
        tokio::spawn(async move {
            let mut guard = guard;
            let mut piece = piece;
            loop {
                blob.sha_wanted.store(false, Ordering::SeqCst);
                // A read error leaves the position; the completion check reports it.
                let _ = store.hash_prefix(&blob, &mut guard, piece.take()).await;
                drop(guard);
                if !blob.sha_wanted.load(Ordering::SeqCst) {
                    break;
                }
                match blob.sha.clone().try_lock_owned() {
                    Ok(g) => guard = g,
                    Err(_) => break,
                }
            }
        });
    }

    /// Hashes present pieces from the prefix's position on, until a missing one: from memory
    /// where the piece is still there (`piece`, just written; or among the recent pieces, which
    /// is where pieces that landed while the hasher was busy are), else read from the file.
    async fn hash_prefix(&self, blob: &Blob, sha: &mut ShaPrefix, piece: Option<(usize, Bytes)>) -> std::io::Result<()> {
        while sha.next < blob.pieces() && lock(&blob.state).present.get(sha.next) {
            let i = sha.next;
            let held = match &piece {
                Some((at, bytes)) if *at == i => Some(bytes.clone()),
                _ => self.recent_piece(blob, i),
            };
            match held {
                Some(bytes) => {
                    sha.hasher.update(&bytes);
                    sha.from_memory += 1;
                }
                None => {
                    sha.hasher.update(self.inner.io.read_at(&blob.file, blob.piece_offset(i), blob.piece_len(i)).await?);
                    sha.from_file += 1;
                }
            }
            sha.next += 1;
        }
        Ok(())
    }

    /// All pieces are present: check the whole-blob sha256 (only the part the prefix hasher has
    /// not taken in yet is hashed here; `last` is the piece just written, in memory), then mark
    /// complete (durably: data synced, then metadata) or drop.
    async fn complete_pieces(&self, blob: &Arc<Blob>, last: Option<(usize, Bytes)>) -> Result<()> {
        let d = blob.digest;
        let (sha, from_memory, from_file) = {
            let mut prefix = blob.sha.lock().await;
            self.hash_prefix(blob, &mut prefix, last).await.map_err(|e| io_error(&d, "reading blob for verification", e))?;
            if prefix.next != blob.pieces() {
                return Err(StoreError::Dropped(d));
            }
            (prefix.hasher.clone().finalize(), prefix.from_memory, prefix.from_file)
        };
        if sha[..] != d.as_bytes()[..] {
            let mut from: Vec<Source> = lock(&blob.state).sources.iter().flatten().cloned().collect();
            from.sort_by_key(ToString::to_string);
            from.dedup();
            tracing::warn!(digest = %d, sources = %list_sources(&from), "blob failed sha256 verification; dropping it");
            self.drop_blob(blob).await;
            return Err(StoreError::DigestMismatch { digest: d, from });
        }
        let _m = blob.meta_lock.lock().await;
        let meta = {
            let st = lock(&blob.state);
            if st.dropped {
                return Err(StoreError::Dropped(d));
            }
            let mut m = blob.meta_snapshot(&st);
            m.complete = true;
            m
        };
        self.inner.io.sync_data(&blob.file).await.map_err(|e| io_error(&d, "syncing blob", e))?;
        self.persist_meta(blob, meta).await?;
        lock(&blob.state).complete = true;
        blob.notify();
        self.content_changed();
        tracing::debug!(digest = %d, size = blob.size, sha256_pieces_from_memory = from_memory, sha256_pieces_from_file = from_file, "blob complete");
        Ok(())
    }
}

/// Releases a per-piece write claim, also when the writing future is cancelled or fails.
struct Claim<'a> {
    blob: &'a Blob,
    index: usize,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.blob.state).claimed.clear(self.index);
    }
}

/// Waits (on the blob's watch channel, not by polling) until every piece in `range` is present.
async fn wait_pieces(blob: &Blob, range: std::ops::Range<usize>) -> Result<()> {
    let mut rx = blob.changed.subscribe();
    loop {
        {
            let st = lock(&blob.state);
            if st.dropped {
                return Err(StoreError::Dropped(blob.digest));
            }
            if st.present.all_in(range.clone()) {
                return Ok(());
            }
        }
        rx.changed().await.map_err(|_| StoreError::Dropped(blob.digest))?;
    }
}

/// Creates a data file of `size` bytes, reserving the space up front so a full disk fails here,
/// before any byte is written, rather than in the middle of a download.
fn create_file(path: &Path, size: u64) -> std::io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    if size > 0 {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
            f.set_len(size)?;
        }
    }
    Ok(f)
}

/// Startup scan: empties `tmp/`, drops orphans and damaged metadata, returns the valid blobs
/// ordered by metadata mtime (oldest first, as the LRU seed).
fn scan(layout: &Layout) -> std::io::Result<Vec<(Digest, Meta, File)>> {
    fs::create_dir_all(&layout.blobs)?;
    fs::create_dir_all(&layout.tmp)?;
    let mut removed_tmp = 0;
    for e in fs::read_dir(&layout.tmp)? {
        let p = e?.path();
        if p.is_dir() { fs::remove_dir_all(&p)? } else { fs::remove_file(&p)? }
        removed_tmp += 1;
    }
    if removed_tmp > 0 {
        meta::sync_dir(&layout.tmp)?;
        tracing::info!(count = removed_tmp, "removed leftover temporary files");
    }
    let mut metas = Vec::new();
    let mut datas = std::collections::HashSet::new();
    let mut junk = Vec::new();
    for e in fs::read_dir(&layout.blobs)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let parsed = name.split_once('.').and_then(|(h, ext)| {
            digest::parse_hex32(h).map(|b| (Digest::from_sha256_bytes(b), ext.to_owned()))
        });
        match parsed {
            Some((d, ext)) if ext == "meta" => metas.push(d),
            Some((d, ext)) if ext == "data" => {
                datas.insert(d);
            }
            _ => junk.push(p),
        }
    }
    let mut out = Vec::new();
    for d in metas {
        let res = (|| -> Result<(Meta, File, std::time::SystemTime), String> {
            let text = fs::read_to_string(layout.meta(&d)).map_err(|e| e.to_string())?;
            let m = Meta::decode(&d, &text)?;
            let f = OpenOptions::new().read(true).write(true).open(layout.data(&d)).map_err(|e| e.to_string())?;
            let md = f.metadata().map_err(|e| e.to_string())?;
            if md.len() != m.size {
                return Err(format!("data file is {} bytes, metadata says {}", md.len(), m.size));
            }
            let mtime = fs::metadata(layout.meta(&d)).and_then(|m| m.modified()).map_err(|e| e.to_string())?;
            Ok((m, f, mtime))
        })();
        datas.remove(&d);
        match res {
            Ok((m, f, t)) => out.push((t, d, m, f)),
            Err(reason) => {
                tracing::warn!(digest = %d, %reason, "discarding damaged blob");
                meta::remove_blob_files(layout, &d)?;
            }
        }
    }
    for d in datas {
        tracing::info!(digest = %d, "removing data file without metadata (interrupted write)");
        junk.push(layout.data(&d));
    }
    let had_junk = !junk.is_empty();
    for p in junk {
        if p.is_dir() { fs::remove_dir_all(&p)? } else { fs::remove_file(&p)? }
    }
    if had_junk {
        meta::sync_dir(&layout.blobs)?;
    }
    out.sort_by_key(|(t, d, _, _)| (*t, *d));
    Ok(out.into_iter().map(|(_, d, m, f)| (d, m, f)).collect())
}
