//! The bulk channel: piece data on kernel TCP with TLS 1.3 (rustls), beside the QUIC endpoint.
//!
//! Why: QUIC encrypts and segments every 1,200-1,500-byte packet in userspace; kernel TCP moves
//! 64 KiB segments (TSO/GRO) and rustls seals 16 KiB records, so the same verified bytes cost
//! about half the CPU (bench/RESULTS.md, transport). Only `Pieces` requests travel here;
//! manifests, bitfields and fetches stay on QUIC, which also decides liveness.
//!
//! Shape (PROTOCOL.md, "Bulk channel"): one connection per pair of peers, at the TCP port with
//! the number of the peer's QUIC port, the same cluster certificates, ALPN `peerd-bulk/1`.
//! Requests are pipelined and answered in order: `u32` length + a `Pieces` request frame; the
//! answer is a status byte and then, for `Ok`, the pieces' bytes (the client knows their
//! lengths from the manifest), else a `u16`-prefixed message. A peer that cannot be reached on
//! TCP (an older agent, a firewall that lets only UDP through) is asked over QUIC instead for
//! `NO_BULK_FOR`.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, Semaphore},
};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use tracing::debug;

use super::tls;
use super::wire::{self, Request, Status};
use crate::store::Digest;

/// How long a peer whose bulk channel could not be reached is asked over QUIC instead.
const NO_BULK_FOR: Duration = Duration::from_secs(30);
/// Requests written ahead of their answers on one connection (the swarm keeps at most a few in
/// flight per peer; more wait for room).
const PIPELINE: usize = 16;
/// An answer (or the client's first frame) that makes no progress for this long breaks its connection: every request behind
/// it fails and the next request dials again (the swarm's own request timeout is the same).
const STALL: Duration = Duration::from_secs(10);
/// A client connection unused this long is closed (before the server's `SERVER_IDLE`).
const CLIENT_IDLE: Duration = Duration::from_secs(30);
/// A server connection with no request this long is closed.
const SERVER_IDLE: Duration = Duration::from_secs(60);
/// Handshakes in progress at once, and how long one may take: an unauthenticated client holds
/// no more than this (the XDP guard covers only the UDP ports).
const MAX_HANDSHAKES: usize = 64;
/// Of those, from one source address: one host cannot take them all and push every honest
/// peer over to QUIC.
const MAX_HANDSHAKES_PER_SOURCE: usize = 4;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Authenticated connections served at once.
const MAX_CONNECTIONS: usize = 1024;

/// Reason-coded counters of the bulk channel.
#[derive(Default, Debug)]
pub struct BulkCounters {
    /// Piece requests answered over the bulk channel (either side).
    pub requests: AtomicU64,
    /// Piece requests sent over QUIC because the peer's bulk channel could not be reached.
    pub fallbacks: AtomicU64,
    /// Connections refused: no cluster certificate, too many handshakes or connections, a
    /// request that is not `Pieces`, a malformed frame.
    pub refused: AtomicU64,
    /// Connections that broke with answers outstanding (reset, stalled, malformed answer).
    pub broken: AtomicU64,
}

/// Why a request did not get an answer over the bulk channel.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// Not reachable on TCP now: ask over QUIC.
    #[error("no bulk channel: {0}")]
    Unavailable(String),
    /// The connection broke with this request outstanding.
    #[error("bulk channel broke: {0}")]
    Broken(String),
}

/// An answer to a `Pieces` request.
pub enum Answer {
    /// The pieces, in order.
    Pieces(Vec<Vec<u8>>),
    /// Refused with this status (`NotFound`: "not yet" or "not here").
    Refused(Status),
}

struct Job {
    frame: Bytes,
    lens: Vec<u32>,
    reply: oneshot::Sender<Result<Answer, BulkError>>,
}

/// A peer's connection (its request queue), behind a lock held while dialling.
type Slot = Arc<tokio::sync::Mutex<Option<mpsc::Sender<Job>>>>;

/// The dialling side: one pipelined connection per peer.
pub struct Client {
    connector: TlsConnector,
    /// This node's QUIC port, sent first on every connection (`serve_connection`).
    quic_port: u16,
    dial_timeout: Duration,
    /// Per peer, the connection's request queue; the async lock serialises dialling.
    conns: Mutex<HashMap<SocketAddr, Slot>>,
    /// Peers not reachable on TCP, until when.
    off: Mutex<HashMap<SocketAddr, Instant>>,
    counters: Arc<BulkCounters>,
}

impl Client {
    pub fn new(identity: &tls::Identity, quic_port: u16, dial_timeout: Duration, counters: Arc<BulkCounters>) -> Result<Self, tls::TlsError> {
        Ok(Self {
            connector: TlsConnector::from(identity.bulk_client_config()?),
            quic_port,
            dial_timeout,
            conns: Mutex::new(HashMap::new()),
            off: Mutex::new(HashMap::new()),
            counters,
        })
    }

    /// Asks `peer` for pieces `first..first + lens.len()` of `d`, whose lengths are `lens`.
    pub async fn pieces(&self, peer: SocketAddr, d: &Digest, first: u32, lens: Vec<u32>) -> Result<Answer, BulkError> {
        if self.off.lock().unwrap_or_else(|e| e.into_inner()).get(&peer).is_some_and(|until| Instant::now() < *until) {
            self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Err(BulkError::Unavailable("not reachable on TCP a moment ago".into()));
        }
        let req = Request::Pieces { digest: *d, first, count: lens.len() as u32 };
        let body = req.encode().map_err(|e| BulkError::Broken(e.to_string()))?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let frame = Bytes::from(frame);
        // A connection that closed while idle is found out by the send; one redial then.
        for _ in 0..2 {
            let tx = self.connection(peer).await?;
            let (reply, answer) = oneshot::channel();
            if tx.send(Job { frame: frame.clone(), lens: lens.clone(), reply }).await.is_err() {
                continue;
            }
            return match answer.await {
                Ok(r) => r,
                Err(_) => Err(BulkError::Broken("connection closed".into())),
            };
        }
        Err(BulkError::Broken("connection closed".into()))
    }

    async fn connection(&self, peer: SocketAddr) -> Result<mpsc::Sender<Job>, BulkError> {
        let slot = self.conns.lock().unwrap_or_else(|e| e.into_inner()).entry(peer).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let tls = match tokio::time::timeout(self.dial_timeout, self.dial(peer)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.unavailable(peer, e.to_string())),
            Err(_) => return Err(self.unavailable(peer, format!("no handshake within {:?}", self.dial_timeout))),
        };
        let (tx, rx) = mpsc::channel(PIPELINE);
        tokio::spawn(drive(tls, rx, self.counters.clone()));
        *slot = Some(tx.clone());
        Ok(tx)
    }

    async fn dial(&self, peer: SocketAddr) -> io::Result<client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(peer).await?;
        tcp.set_nodelay(true)?;
        prefer_bbr(&tcp);
        let name = ServerName::try_from(tls::SERVER_NAME).map_err(io::Error::other)?;
        let mut tls = self.connector.connect(name, tcp).await?;
        tls.write_all(&self.quic_port.to_be_bytes()).await?;
        Ok(tls)
    }

    fn unavailable(&self, peer: SocketAddr, msg: String) -> BulkError {
        debug!(%peer, "bulk channel unreachable, using QUIC for {NO_BULK_FOR:?}: {msg}");
        self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.off.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, Instant::now() + NO_BULK_FOR);
        BulkError::Unavailable(msg)
    }
}

/// Runs one client connection: writes queued requests, and reads their answers in order.
async fn drive(tls: client::TlsStream<TcpStream>, mut jobs: mpsc::Receiver<Job>, counters: Arc<BulkCounters>) {
    let (mut rd, mut wr) = tokio::io::split(tls);
    let (pending_tx, mut pending) = mpsc::channel::<(Vec<u32>, oneshot::Sender<Result<Answer, BulkError>>)>(PIPELINE);
    let reader = tokio::spawn(async move {
        while let Some((lens, reply)) = pending.recv().await {
            match read_answer(&mut rd, &lens).await {
                Ok(a) => {
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    let _ = reply.send(Ok(a));
                }
                Err(e) => {
                    counters.broken.fetch_add(1, Ordering::Relaxed);
                    let _ = reply.send(Err(BulkError::Broken(e.to_string())));
                    // Dropping `pending` fails the requests behind this one and stops the writer.
                    return;
                }
            }
        }
    });
    loop {
        let job = tokio::select! {
            j = jobs.recv() => j,
            _ = pending_tx.closed() => None,
            _ = tokio::time::sleep(CLIENT_IDLE), if pending_tx.capacity() == PIPELINE => None,
        };
        let Some(job) = job else { break };
        if let Err(e) = async {
            wr.write_all(&job.frame).await?;
            wr.flush().await
        }
        .await
        {
            let _ = job.reply.send(Err(BulkError::Broken(e.to_string())));
            break;
        }
        if pending_tx.send((job.lens, job.reply)).await.is_err() {
            break;
        }
    }
    // Queued jobs fail when `jobs` drops; answers outstanding are still read.
    drop(jobs);
    drop(pending_tx);
    let _ = reader.await;
}

/// Reads one answer: a status byte, then the pieces or a message. Each read is bounded by
/// `STALL`.
async fn read_answer<R: AsyncRead + Unpin>(rd: &mut R, lens: &[u32]) -> io::Result<Answer> {
    let stall = |e| io::Error::new(io::ErrorKind::TimedOut, format!("no progress for {STALL:?}: {e}"));
    let st = tokio::time::timeout(STALL, rd.read_u8()).await.map_err(stall)??;
    let status = Status::from_u8(st).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unknown status {st}")))?;
    if status != Status::Ok {
        let n = tokio::time::timeout(STALL, rd.read_u16()).await.map_err(stall)??;
        let mut msg = vec![0u8; n as usize];
        tokio::time::timeout(STALL, rd.read_exact(&mut msg)).await.map_err(stall)??;
        return Ok(Answer::Refused(status));
    }
    let mut out = Vec::with_capacity(lens.len());
    for &len in lens {
        // Read into spare capacity: no zeroing, one copy out of rustls's plaintext buffer.
        let mut buf = Vec::with_capacity(len as usize);
        while buf.len() < len as usize {
            let mut limited = (&mut *rd).take((len as usize - buf.len()) as u64);
            let n = tokio::time::timeout(STALL, limited.read_buf(&mut buf)).await.map_err(stall)??;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "answer cut short"));
            }
        }
        out.push(buf);
    }
    Ok(Answer::Pieces(out))
}

/// Where the server writes one answer.
pub struct Out {
    s: server::TlsStream<TcpStream>,
}

impl Out {
    /// Starts an `Ok` answer; the pieces follow with `piece`.
    pub async fn ok(&mut self) -> io::Result<()> {
        self.s.write_all(&[Status::Ok as u8]).await
    }

    pub async fn piece(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes).await
    }

    /// The whole answer: a refusal.
    pub async fn refuse(&mut self, status: Status, msg: &str) -> io::Result<()> {
        self.s.write_all(&wire::status_frame(status, msg)).await
    }
}

/// What answers `Pieces` requests (the transfer's store and containerd path). The answer must
/// be whole: `Out::ok` and exactly the pieces asked for, or `Out::refuse`.
pub trait Pieces: Send + Sync + 'static {
    fn answer<'a>(&'a self, peer: SocketAddr, d: Digest, first: u32, count: u32, out: &'a mut Out) -> impl Future<Output = io::Result<()>> + Send + 'a;
}

/// Serves the bulk channel on `listener` until it fails.
pub async fn serve<P: Pieces>(listener: TcpListener, identity: Arc<rustls::ServerConfig>, pieces: Arc<P>, counters: Arc<BulkCounters>) {
    let acceptor = TlsAcceptor::from(identity);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let (tcp, peer) = crate::httpd::accept(&listener, |e| debug!("bulk accept: {e}")).await;
        let (Some(from_source), Ok(handshake), Ok(slot)) = (
            SourceSlot::take(&per_source, peer.ip()),
            handshakes.clone().try_acquire_owned(),
            connections.clone().try_acquire_owned(),
        ) else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (acceptor, pieces, counters) = (acceptor.clone(), pieces.clone(), counters.clone());
        tokio::spawn(async move {
            let _slot = slot;
            prefer_bbr(&tcp);
            let s = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    // Includes clients without a cluster certificate.
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            drop((handshake, from_source));
            let mut out = Out { s };
            if let Err(e) = serve_connection(&mut out, peer, &*pieces, &counters).await {
                debug!(%peer, "bulk connection: {e}");
            }
            let _ = out.s.shutdown().await;
        });
    }
}

/// One handshake in progress from a source address, counted until dropped.
struct SourceSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Self { counts: counts.clone(), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

async fn serve_connection<P: Pieces>(out: &mut Out, tcp_peer: SocketAddr, pieces: &P, counters: &BulkCounters) -> io::Result<()> {
    // The client's QUIC port comes first: with the connection's address it names the peer as
    // its QUIC connections do, which the origin's hand-out relies on (pieces given to a peer on
    // one channel are not withheld from it on the other).
    let port = tokio::time::timeout(STALL, out.s.read_u16()).await.map_err(|e| io::Error::new(io::ErrorKind::TimedOut, e))??;
    let peer = SocketAddr::new(tcp_peer.ip(), port);
    loop {
        let len = match tokio::time::timeout(SERVER_IDLE, out.s.read_u32()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r? as usize,
        };
        let refuse = |msg: String| {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            io::Error::new(io::ErrorKind::InvalidData, msg)
        };
        if len > wire::MAX_REQUEST {
            out.refuse(Status::BadRequest, "request too large").await?;
            return Err(refuse(format!("request of {len} bytes")));
        }
        let mut frame = vec![0u8; len];
        tokio::time::timeout(STALL, out.s.read_exact(&mut frame)).await.map_err(|e| io::Error::new(io::ErrorKind::TimedOut, e))??;
        match Request::decode(&frame) {
            Ok(Request::Pieces { digest, first, count }) => {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                pieces.answer(peer, digest, first, count, out).await?;
                out.s.flush().await?;
            }
            Ok(_) => {
                out.refuse(Status::BadRequest, "only Pieces requests on the bulk channel").await?;
                return Err(refuse("not a Pieces request".into()));
            }
            Err(e) => {
                out.refuse(Status::BadRequest, &e.to_string()).await?;
                return Err(refuse(e.to_string()));
            }
        }
    }
}

/// BBR for the bulk channel's connections where the kernel has it, whatever the node's default
/// (often Cubic): the reason the QUIC side uses BBR holds for TCP too, Cubic fills the links'
/// queues until loss, and the origin's own upstream download waits behind them (ARCHITECTURE.md,
/// congestion control). Best effort: without BBR the default stays.
fn prefer_bbr(tcp: &TcpStream) {
    use std::os::fd::AsRawFd;
    let name = b"bbr";
    // SAFETY: a valid socket descriptor and a buffer of the given length.
    let r = unsafe { libc::setsockopt(tcp.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_ptr().cast(), name.len() as libc::socklen_t) };
    if r != 0 {
        debug!("bulk channel: BBR not available ({}), the kernel's default congestion control stays", io::Error::last_os_error());
    }
}
