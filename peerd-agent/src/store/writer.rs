//! Streaming writer for upstream downloads, where no piece manifest exists yet.
//!
//! Bytes arrive in order; each completed piece is hashed (blake3, for the manifest peers will
//! use) and written to a file in `tmp/`. Those hashes were computed by us from unverified bytes,
//! so they vouch for nothing: no piece is readable until `finish` has checked the whole-blob
//! sha256 against the digest. Only then is the file renamed into `blobs/` and the metadata
//! (state complete, all piece hashes) committed.

use std::path::PathBuf;
use std::sync::Arc;

use sha2::Digest as _;

use super::meta::{self, Meta};
use super::piece_map::PieceMap;
use super::{io_error, lock, Blob, Manifest, PinGuard, Result, Source, Store, StoreError};

/// Writes one upstream blob. Dropping it without [`BlobWriter::finish`] abandons the download
/// and deletes its temporary file.
pub struct BlobWriter {
    store: Store,
    blob: Arc<Blob>,
    tmp: PathBuf,
    source: Source,
    buf: Vec<u8>,
    /// Offset of `buf[0]` in the blob.
    offset: u64,
    written: u64,
    sha: sha2::Sha256,
    hashes: Vec<blake3::Hash>,
    /// Set once finished or abandoned; later calls fail and `Drop` does nothing.
    done: bool,
    _pin: PinGuard,
}

impl BlobWriter {
    pub(crate) fn new(store: Store, blob: Arc<Blob>, tmp: PathBuf, source: Source, pin: PinGuard) -> Self {
        let cap = blob.piece_size as usize;
        BlobWriter {
            store,
            blob,
            tmp,
            source,
            buf: Vec::with_capacity(cap),
            offset: 0,
            written: 0,
            sha: sha2::Sha256::new(),
            hashes: Vec::new(),
            done: false,
            _pin: pin,
        }
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends bytes. Any error abandons the download (the temporary file is deleted).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        let d = self.blob.digest;
        if self.done {
            return Err(StoreError::Dropped(d));
        }
        if self.written + data.len() as u64 > self.blob.size {
            let actual = self.written + data.len() as u64;
            self.abandon().await;
            return Err(StoreError::SizeMismatch { digest: d, expected: self.blob.size, actual });
        }
        let ps = self.blob.piece_size as usize;
        while !data.is_empty() {
            let take = (ps - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            self.sha.update(&data[..take]);
            self.written += take as u64;
            data = &data[take..];
            if self.buf.len() == ps {
                self.flush_piece().await?;
            }
        }
        Ok(())
    }

    async fn flush_piece(&mut self) -> Result<()> {
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(self.blob.piece_size as usize));
        let len = piece.len() as u64;
        self.hashes.push(blake3::hash(&piece));
        if let Err(e) = self.store.inner.io.write_at(&self.blob.file, self.offset, piece).await {
            return Err(self.fail(io_error(&self.blob.digest, "writing download", e)).await);
        }
        self.offset += len;
        Ok(())
    }

    /// Verifies the sha256, makes the blob durable and readable, and returns its manifest. On
    /// mismatch the download is deleted and [`StoreError::DigestMismatch`] names the source.
    pub async fn finish(mut self) -> Result<Manifest> {
        let d = self.blob.digest;
        if self.done {
            return Err(StoreError::Dropped(d));
        }
        if !self.buf.is_empty() {
            self.flush_piece().await?;
        }
        if self.written != self.blob.size {
            let err = StoreError::SizeMismatch { digest: d, expected: self.blob.size, actual: self.written };
            return Err(self.fail(err).await);
        }
        let sha = std::mem::take(&mut self.sha).finalize();
        if sha[..] != d.as_bytes()[..] {
            tracing::warn!(digest = %d, source = %self.source, "download failed sha256 verification; dropping it");
            let err = StoreError::DigestMismatch { digest: d, from: vec![self.source.clone()] };
            return Err(self.fail(err).await);
        }
        if let Err(e) = self.store.inner.io.sync_data(&self.blob.file).await {
            return Err(self.fail(io_error(&d, "syncing download", e)).await);
        }
        let manifest = Manifest { size: self.blob.size, piece_size: self.blob.piece_size, pieces: self.hashes.clone() };
        let m = Meta {
            size: self.blob.size,
            piece_size: self.blob.piece_size,
            complete: true,
            pieces: self.hashes.iter().copied().map(Some).collect(),
        };
        let ns = self.store.inner.namespace.lock().await;
        // Rename first, metadata second: a crash in between leaves a data file without
        // metadata, which `open` deletes.
        let (layout, tmp) = (self.store.inner.layout.clone(), self.tmp.clone());
        let committed = super::blocking(move || {
            let res = (|| {
                std::fs::rename(&tmp, layout.data(&d))?;
                meta::sync_dir(&layout.blobs)?;
                meta::write_meta(&layout, &d, &m)
            })();
            if res.is_err() {
                let _ = meta::remove_blob_files(&layout, &d);
            }
            res
        })
        .await;
        drop(ns);
        if let Err(e) = committed {
            return Err(self.fail(io_error(&d, "committing download", e)).await);
        }
        {
            let mut st = lock(&self.blob.state);
            st.present = PieceMap::full(self.hashes.len());
            st.hashes = self.hashes.iter().copied().map(Some).collect();
            st.sources = vec![Some(self.source.clone()); self.hashes.len()];
            st.streaming = false;
            st.complete = true;
        }
        self.done = true;
        self.blob.notify();
        self.store.content_changed();
        tracing::debug!(digest = %d, size = self.blob.size, source = %self.source, "download complete");
        Ok(manifest)
    }

    /// Abandons the download and returns `err`; a full disk also triggers eviction.
    async fn fail(&mut self, err: StoreError) -> StoreError {
        self.abandon().await;
        if matches!(err, StoreError::NoSpace { .. }) {
            let ns = self.store.inner.namespace.lock().await;
            self.store.evict(&ns, 0).await.ok();
        }
        err
    }

    async fn abandon(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let tmp = self.tmp.clone();
        let _ = super::blocking(move || std::fs::remove_file(tmp)).await;
        self.unindex();
    }

    /// Removes this blob from the index and wakes waiters (who then see it dropped).
    fn unindex(&self) {
        {
            let mut idx = lock(&self.store.inner.index);
            let d = self.blob.digest;
            if idx.blobs.get(&d).is_some_and(|b| Arc::ptr_eq(b, &self.blob)) {
                idx.blobs.remove(&d);
                idx.lru.remove(&d);
            }
        }
        lock(&self.blob.state).dropped = true;
        self.blob.notify();
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            // The temp file has a unique name in tmp/, so deleting it synchronously here cannot
            // race with anything; a crash before this leaves it for `open` to delete.
            let _ = std::fs::remove_file(&self.tmp);
            self.unindex();
        }
    }
}
