//! The response body type: empty, one buffer, a channel fed by a task (streams from upstream),
//! or a byte range of a verified file sent with sendfile(2) (zero-copy cache hits). An `Err` item
//! in a stream aborts the response, so a client never mistakes a cut-short body for a whole one.
use std::fs::File;

use bytes::Bytes;
use tokio::sync::mpsc;

pub enum Body {
    Empty,
    Full(Bytes),
    Stream(mpsc::Receiver<std::io::Result<Bytes>>),
    /// `len` bytes of `file` from `offset`; `hold` is kept until the last byte is sent (the
    /// mirror's pin, which keeps the blob from eviction meanwhile).
    File { file: File, offset: u64, len: u64, hold: Box<dyn Send> },
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(b.into())
    }

    /// A channel body and its sender; the bound gives backpressure (the feeding task waits for a
    /// slow client instead of buffering the blob in memory).
    pub fn channel(depth: usize) -> (mpsc::Sender<std::io::Result<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, Body::Stream(rx))
    }
}
