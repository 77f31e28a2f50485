//! Piece data I/O: io_uring on one dedicated thread, or pread/pwrite on tokio's blocking pool.
//!
//! io_uring keeps many piece reads/writes in flight from a single thread without tying up tokio
//! workers or growing the blocking pool. It is disabled on some hosts (the
//! `kernel.io_uring_disabled` sysctl, seccomp in container runtimes), so plain positional I/O on
//! blocking threads is the fallback. The choice is made once per store and logged.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

/// Which backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring if the kernel allows it, else blocking pread/pwrite.
    #[default]
    Auto,
    /// Always blocking pread/pwrite (tests, or hosts where io_uring misbehaves).
    Blocking,
}

/// Ring depth; also the cap on operations in flight, so submissions never overflow the queue.
const DEPTH: u32 = 64;
/// Largest single SQE transfer; longer requests are resubmitted in chunks.
const MAX_CHUNK: usize = 1 << 30;

/// The I/O backend. An enum rather than a trait object: two variants, no dynamic dispatch needed.
pub(crate) enum Io {
    Uring(mpsc::Sender<Request>),
    Blocking,
}

pub(crate) struct Request {
    file: Arc<File>,
    op: Op,
    reply: oneshot::Sender<io::Result<Vec<u8>>>,
}

enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Sync,
}

impl Io {
    /// Picks the backend once. Falls back (with a log line saying why) when io_uring is
    /// administratively disabled or ring setup fails.
    pub(crate) fn start(mode: IoMode) -> Io {
        if mode == IoMode::Blocking {
            tracing::info!(backend = "blocking", "store I/O: blocking pread/pwrite (configured)");
            return Io::Blocking;
        }
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if disabled != 0 {
            tracing::info!(backend = "blocking", io_uring_disabled = disabled,
                "store I/O: io_uring disabled by sysctl, using blocking pread/pwrite");
            return Io::Blocking;
        }
        let ring = match IoUring::new(DEPTH) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(backend = "blocking", error = %e,
                    "store I/O: io_uring setup failed, using blocking pread/pwrite");
                return Io::Blocking;
            }
        };
        let (tx, rx) = mpsc::channel();
        match std::thread::Builder::new()
            .name("peerd-store-io".into())
            .spawn(move || ring_thread(ring, rx))
        {
            Ok(_) => {
                tracing::info!(backend = "io_uring", depth = DEPTH, "store I/O: io_uring thread started");
                Io::Uring(tx)
            }
            Err(e) => {
                tracing::info!(backend = "blocking", error = %e,
                    "store I/O: cannot start io_uring thread, using blocking pread/pwrite");
                Io::Blocking
            }
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Io::Uring(_) => "io_uring",
            Io::Blocking => "blocking",
        }
    }

    /// Reads exactly `len` bytes at `offset` (short file is `UnexpectedEof`).
    pub(crate) async fn read_at(&self, file: &Arc<File>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match self {
            Io::Uring(tx) => submit(tx, file, Op::Read { offset, len }).await,
            Io::Blocking => {
                let file = file.clone();
                blocking(move || {
                    let mut buf = vec![0; len];
                    file.read_exact_at(&mut buf, offset)?;
                    Ok(buf)
                })
                .await
            }
        }
    }

    /// Writes all of `data` at `offset`; hands the buffer back (callers hash it afterwards
    /// instead of reading it back from the file).
    pub(crate) async fn write_at(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> io::Result<Vec<u8>> {
        match self {
            Io::Uring(tx) => submit(tx, file, Op::Write { offset, data }).await,
            Io::Blocking => {
                let file = file.clone();
                blocking(move || file.write_all_at(&data, offset).map(|()| data)).await
            }
        }
    }

    /// fdatasync: the data (and the size, if it changed) is durable when this returns.
    pub(crate) async fn sync_data(&self, file: &Arc<File>) -> io::Result<()> {
        match self {
            Io::Uring(tx) => submit(tx, file, Op::Sync).await.map(drop),
            Io::Blocking => {
                let file = file.clone();
                blocking(move || file.sync_data()).await
            }
        }
    }
}

/// Runs blocking work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("blocking task failed: {e}"))))
}

fn gone() -> io::Error {
    io::Error::other("store I/O thread stopped")
}

async fn submit(tx: &mpsc::Sender<Request>, file: &Arc<File>, op: Op) -> io::Result<Vec<u8>> {
    let (reply, rx) = oneshot::channel();
    tx.send(Request { file: file.clone(), op, reply }).map_err(|_| gone())?;
    rx.await.unwrap_or_else(|_| Err(gone()))
}

/// One operation in the ring. Owns its buffer and file, so both outlive the kernel's use of them
/// even if the requesting future is dropped.
struct InFlight {
    file: Arc<File>,
    kind: Kind,
    /// Reads: an uninitialised allocation of `want` bytes whose length follows what the kernel
    /// has filled in (no zeroing of a buffer about to be overwritten). Writes: the data.
    buf: Vec<u8>,
    want: usize,
    offset: u64,
    done: usize,
    reply: oneshot::Sender<io::Result<Vec<u8>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Sync,
}

impl InFlight {
    fn entry(&mut self, slot: usize) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let remaining = (self.want - self.done).min(MAX_CHUNK) as u32;
        let offset = self.offset + self.done as u64;
        let e = match self.kind {
            // SAFETY (both): the pointer is into `self.buf`'s allocation (for reads, its spare
            // capacity: `done <= want <= capacity`), which is neither moved nor freed until this
            // op's completion has been reaped.
            Kind::Read => opcode::Read::new(fd, self.buf.spare_capacity_mut().as_mut_ptr().cast::<u8>(), remaining)
                .offset(offset)
                .build(),
            Kind::Write => opcode::Write::new(fd, self.buf[self.done..].as_ptr(), remaining)
                .offset(offset)
                .build(),
            Kind::Sync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        };
        e.user_data(slot as u64)
    }
}

fn ring_thread(mut ring: IoUring, rx: mpsc::Receiver<Request>) {
    let mut slots: Vec<Option<InFlight>> = (0..DEPTH).map(|_| None).collect();
    let mut free: Vec<usize> = (0..DEPTH as usize).rev().collect();
    let mut closed = false;
    loop {
        // Intake: block only when nothing is in flight; otherwise take what is queued.
        while let Some(&slot) = free.last() {
            let req = if free.len() == DEPTH as usize {
                if closed {
                    return;
                }
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            };
            free.pop();
            let (kind, buf, want, offset) = match req.op {
                Op::Read { offset, len } => (Kind::Read, Vec::with_capacity(len), len, offset),
                Op::Write { offset, data } => {
                    let len = data.len();
                    (Kind::Write, data, len, offset)
                }
                Op::Sync => (Kind::Sync, Vec::new(), 0, 0),
            };
            let mut op = InFlight { file: req.file, kind, buf, want, offset, done: 0, reply: req.reply };
            if kind != Kind::Sync && op.want == 0 {
                let _ = op.reply.send(Ok(op.buf));
                free.push(slot);
                continue;
            }
            let e = op.entry(slot);
            slots[slot] = Some(op);
            push(&mut ring, &e, &mut slots, &mut free, slot);
        }
        if free.len() == DEPTH as usize {
            continue;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "io_uring submit failed; failing in-flight store I/O");
                for s in slots.iter_mut() {
                    if let Some(op) = s.take() {
                        let _ = op.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                }
                return;
            }
        }
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (slot, res) in done {
            let slot = slot as usize;
            let Some(mut op) = slots.get_mut(slot).and_then(Option::take) else { continue };
            let outcome = if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else if op.kind == Kind::Sync {
                Some(Ok(Vec::new()))
            } else if res == 0 {
                Some(Err(match op.kind {
                    Kind::Read => io::Error::from(io::ErrorKind::UnexpectedEof),
                    _ => io::Error::from(io::ErrorKind::WriteZero),
                }))
            } else {
                op.done += res as usize;
                if op.kind == Kind::Read {
                    // SAFETY: the kernel filled bytes [0, done) of the allocation (each
                    // completed read continued where the previous one stopped), done <= want
                    // <= capacity.
                    unsafe { op.buf.set_len(op.done.min(op.want)) };
                }
                (op.done >= op.want).then(|| Ok(std::mem::take(&mut op.buf)))
            };
            match outcome {
                Some(r) => {
                    let _ = op.reply.send(r);
                    free.push(slot);
                }
                None => {
                    // Short transfer: resubmit the remainder from the same slot.
                    let e = op.entry(slot);
                    slots[slot] = Some(op);
                    push(&mut ring, &e, &mut slots, &mut free, slot);
                }
            }
        }
    }
}

fn push(
    ring: &mut IoUring,
    e: &io_uring::squeue::Entry,
    slots: &mut [Option<InFlight>],
    free: &mut Vec<usize>,
    slot: usize,
) {
    // SAFETY: the entry's buffer and fd are owned by `slots[slot]` until its completion is reaped.
    let pushed = unsafe { ring.submission().push(e) };
    if pushed.is_err() {
        // Cannot happen (in-flight ops <= ring depth), but never leave a caller hanging.
        if let Some(op) = slots[slot].take() {
            let _ = op.reply.send(Err(io::Error::other("io_uring submission queue full")));
        }
        free.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(io: Io) {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true)
                .open(dir.path().join("f")).unwrap(),
        );
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        io.write_at(&file, 4096, data.clone()).await.unwrap();
        io.sync_data(&file).await.unwrap();
        assert_eq!(io.read_at(&file, 4096, data.len()).await.unwrap(), data);
        assert_eq!(io.read_at(&file, 4096 + 10, 5).await.unwrap(), &data[10..15]);
        assert!(io.read_at(&file, 4096, data.len() + 1).await.is_err(), "short read is an error");
        assert_eq!(io.read_at(&file, 0, 0).await.unwrap(), Vec::<u8>::new());
        // Many concurrent ops (more than the ring depth).
        let io = Arc::new(io);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let (io, file) = (io.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                io.write_at(&file, 1_000_000 + i * 10, vec![i as u8; 10]).await.unwrap();
                io.read_at(&file, 1_000_000 + i * 10, 10).await.unwrap()
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), vec![i as u8; 10]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_backend_round_trip() {
        let io = Io::start(IoMode::Auto);
        eprintln!("backend: {}", io.name());
        round_trip(io).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forced_blocking_backend_round_trip() {
        let io = Io::start(IoMode::Blocking);
        assert_eq!(io.name(), "blocking");
        round_trip(io).await;
    }
}
