//! Writes an upstream body into the store piece by piece, hashing each piece as it completes, so
//! peers can fetch pieces of a blob while it is still arriving from upstream (the swarm starts
//! with the first piece, not after the last). Those blake3 hashes are this node's own; they only
//! let receivers check that pieces travelled intact. The blob becomes complete, and servable to
//! any client, only when the last piece lands and the whole-blob sha256 matches (`put_piece`);
//! until then clients are never served from it. On failure the partial blob is removed.
use crate::store::{Digest, PutOutcome, Source, Store, StoreError};

pub struct PieceFeed {
    store: Store,
    d: Digest,
    piece_size: usize,
    buf: Vec<u8>,
    next: usize,
    source: Source,
    done: bool,
}

impl PieceFeed {
    pub async fn new(store: &Store, d: &Digest, size: u64, source: Source) -> Result<Self, StoreError> {
        store.declare(d, size).await?;
        let piece_size = store.piece_size() as usize;
        Ok(Self { store: store.clone(), d: *d, piece_size, buf: Vec::with_capacity(piece_size), next: 0, source, done: false })
    }

    async fn put(&mut self, piece: Vec<u8>) -> Result<PutOutcome, StoreError> {
        let hash = blake3::hash(&piece);
        let i = self.next;
        self.next += 1;
        self.store.put_piece(&self.d, i, piece, hash, self.source.clone()).await
    }

    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let take = (self.piece_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.piece_size {
                let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(self.piece_size));
                if let Err(e) = self.put(piece).await {
                    self.abandon();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Stores the last piece; succeeds only if the blob is now complete and its sha256 matched.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            let piece = std::mem::take(&mut self.buf);
            if let Err(e) = self.put(piece).await {
                self.abandon();
                return Err(e);
            }
        }
        self.done = true;
        if self.store.has(&self.d) {
            Ok(())
        } else {
            // Some pieces are being written by a concurrent peer download, which completes (and
            // verifies) the blob; leave it to that writer.
            Err(StoreError::NotFound(self.d))
        }
    }

    fn abandon(&mut self) {
        self.done = true;
        let (store, d) = (self.store.clone(), self.d);
        tokio::spawn(async move {
            if !store.has(&d) {
                let _ = store.remove(&d).await;
            }
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
