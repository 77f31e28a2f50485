//! Writes an upstream body into the store piece by piece, hashing each piece as it completes, so
//! peers can fetch pieces of a blob while it is still arriving from upstream (the swarm starts
//! with the first piece, not after the last). Those blake3 hashes are this node's own; they only
//! let receivers check that pieces travelled intact. The blob becomes complete, and servable to
//! any client, only when the last piece lands and the whole-blob sha256 matches (`put_piece`);
//! until then clients are never served from it. On failure the partial blob is removed.
//!
//! Up to `IN_FLIGHT` pieces are hashed and written at once, off the reading task: the upstream
//! body keeps being read while a piece is synced to disk (a stalled reader lets the TCP window
//! close, and upstream is the one link every node waits on).
use std::collections::VecDeque;

use tokio::task::JoinHandle;

use crate::store::{Digest, PutOutcome, Source, Store, StoreError};

const IN_FLIGHT: usize = 4;

pub struct PieceFeed {
    store: Store,
    d: Digest,
    piece_size: usize,
    buf: Vec<u8>,
    next: usize,
    source: Source,
    done: bool,
    pending: VecDeque<JoinHandle<Result<PutOutcome, StoreError>>>,
    /// A blob being written is never evicted under it (a small budget would otherwise pick
    /// the newest, still incomplete, blob and lose the fetch).
    _pin: Option<crate::store::PinGuard>,
}

impl PieceFeed {
    pub async fn new(store: &Store, d: &Digest, size: u64, source: Source) -> Result<Self, StoreError> {
        Self::at(store, d, size, 0, source).await
    }

    /// A feed whose first byte is the start of piece `first` (a byte range of a split fetch).
    pub async fn at(store: &Store, d: &Digest, size: u64, first: usize, source: Source) -> Result<Self, StoreError> {
        store.declare(d, size).await?;
        let pin = store.pin(d);
        let piece_size = store.piece_size() as usize;
        Ok(Self { store: store.clone(), d: *d, piece_size, buf: Vec::with_capacity(piece_size), next: first, source, done: false, pending: VecDeque::new(), _pin: pin })
    }

    /// Starts storing `piece`; waits for the oldest write while `max` are outstanding.
    async fn put(&mut self, piece: Vec<u8>, max: usize) -> Result<(), StoreError> {
        let (store, d, i, source) = (self.store.clone(), self.d, self.next, self.source.clone());
        self.next += 1;
        self.pending.push_back(tokio::spawn(async move {
            let hash = blake3::hash(&piece);
            store.put_piece(&d, i, piece, hash, source).await
        }));
        while self.pending.len() > max {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), StoreError> {
        let Some(t) = self.pending.pop_front() else { return Ok(()) };
        match t.await {
            Ok(r) => r.map(|_| ()),
            Err(e) => Err(StoreError::Io { context: format!("storing a piece of {}", self.d), source: std::io::Error::other(e.to_string()) }),
        }
    }

    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let take = (self.piece_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.piece_size {
                let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(self.piece_size));
                if let Err(e) = self.put(piece, IN_FLIGHT).await {
                    self.abandon();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Stores the last piece of a byte range (a whole piece, or the blob's short last one) and
    /// waits for the writes; the blob need not be complete (other parts come from peers). If
    /// this completed it, its sha256 was checked (a mismatch is the error).
    pub async fn finish_part(mut self) -> Result<(), StoreError> {
        self.flush().await
    }

    /// Stores the last piece; succeeds only if the blob is now complete and its sha256 matched.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        self.flush().await?;
        if self.store.has(&self.d) {
            Ok(())
        } else {
            // Some pieces are being written by a concurrent peer download, which completes (and
            // verifies) the blob; leave it to that writer.
            Err(StoreError::NotFound(self.d))
        }
    }

    /// Writes the buffered rest as the last piece and waits for every write; gives the blob up
    /// on failure.
    async fn flush(&mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            let piece = std::mem::take(&mut self.buf);
            if let Err(e) = self.put(piece, IN_FLIGHT).await {
                self.abandon();
                return Err(e);
            }
        }
        while !self.pending.is_empty() {
            if let Err(e) = self.settle_one().await {
                self.abandon();
                return Err(e);
            }
        }
        self.done = true;
        Ok(())
    }

    /// Keeps the whole pieces written so far (waiting for their writes) and drops the unfinished
    /// one: the rest of the blob is to come by range from another attempt. Nothing becomes
    /// readable as a blob until every piece is there and the sha256 over all of them matched,
    /// so pieces of two bodies of the same digest can be mixed without risk.
    pub async fn keep_partial(mut self) {
        self.buf.clear();
        while !self.pending.is_empty() {
            if self.settle_one().await.is_err() {
                self.abandon();
                return;
            }
        }
        self.done = true;
    }

    /// Gives up on the blob and removes what was stored of it before returning, so a request
    /// that follows finds no partial blob left by this one (dropping does the same later).
    pub async fn discard(mut self) {
        self.stop_pending();
        self.store.abandon_upstream(&self.d).await;
    }

    /// Marks the feed finished and aborts the piece writes still running.
    fn stop_pending(&mut self) {
        self.done = true;
        for t in self.pending.drain(..) {
            t.abort();
        }
    }

    fn abandon(&mut self) {
        self.stop_pending();
        let (store, d) = (self.store.clone(), self.d);
        tokio::spawn(async move {
            store.abandon_upstream(&d).await;
        });
    }
}

impl Drop for PieceFeed {
    fn drop(&mut self) {
        if !self.done {
            self.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob being written is pinned: a second blob that needs its room is refused (NoRoom)
    /// instead of evicting the first under its writer.
    #[tokio::test]
    async fn a_blob_being_written_is_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::store::StoreConfig::new(6 << 20)).await.unwrap();
        let d = |b: u8| Digest::from_sha256_bytes([b; 32]);
        let mut a = PieceFeed::new(&store, &d(1), 4 << 20, Source::Upstream("t".into())).await.unwrap();
        a.write(&vec![7u8; 2 << 20]).await.unwrap();
        let b = PieceFeed::new(&store, &d(2), 4 << 20, Source::Upstream("t".into())).await;
        assert!(matches!(b, Err(StoreError::NoRoom { .. })), "the second blob took the first one's room: {:?}", b.err());
        assert!(store.present_pieces(&d(1)).is_some(), "the blob being written was evicted");
        a.discard().await;
        // With the first given up, the second fits.
        assert!(PieceFeed::new(&store, &d(2), 4 << 20, Source::Upstream("t".into())).await.is_ok());
    }
}
