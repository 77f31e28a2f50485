//! Peer transfer: agents fetch verified pieces from each other over QUIC (quinn) with mutual TLS
//! derived from the cluster secret (`tls`), using a small versioned protocol (`wire`, written
//! down in PROTOCOL.md) and a scheduler that spreads pieces over holders (`swarm`).
//!
//! Roles: every agent serves complete blobs from its store to authenticated peers, and answers
//! `Fetch` (get this blob from upstream with these credentials) through the [`Fetcher`] given
//! at [`Transfer::serve`] (the cluster coordinator), which also calls [`Transfer::download`] on
//! a miss when peers hold a blob.
mod bulk;
mod congestion;
pub mod handout;
pub mod swarm;
pub mod tls;
pub mod wire;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::containerd::ContainerdContent;
use crate::ratelimit::RateLimit;
use crate::store::{Digest, PutOutcome, Source, Store, StoreError};
use swarm::{Assignment, Download, Failure, SwarmConfig};
pub use wire::Part;
use wire::{Request, Status, WireManifest};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("binding the peer endpoint {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("peer {peer}: {msg}")]
    Peer { peer: SocketAddr, msg: String },
    /// No handshake, or the connection died (QUIC's idle timeout): the peer is gone for now.
    #[error("peer {peer} unreachable: {msg}")]
    Unreachable { peer: SocketAddr, msg: String },
    /// Every piece matched the manifest the cluster gave, the blob did not match its digest.
    #[error("peer {peer} gave a manifest of a blob that does not match its digest: {msg}")]
    Lied { peer: SocketAddr, msg: String },
    #[error("no peer could provide {0}")]
    NoPeer(Digest),
    #[error("blob {digest}: peers use {theirs}-byte pieces, this store {ours}")]
    PieceSize { digest: Digest, theirs: u32, ours: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a fetch from upstream (for this node's clients, for a peer, or as the blob's owner)
/// failed. Callers decide on the kind: a lying cluster is distrusted, a refused origin is not
/// retried, an upstream failure may be.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not a configured upstream origin: a peer cannot make this node fetch it.
    #[error("{0} is not a configured upstream origin")]
    NotAllowed(String),
    #[error("bad URL: {0}")]
    BadUrl(String),
    /// Upstream unreachable, timed out, or its body broke off.
    #[error("upstream: {0}")]
    Upstream(String),
    /// Upstream answered with a status that cannot be used.
    #[error("upstream answered {0}")]
    Status(u16),
    /// Upstream's answer broke the protocol (range bounds, lengths, missing headers).
    #[error("upstream {0}")]
    Protocol(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The cluster failed the fetch; `TransferError::Lied` means it gave a wrong blob.
    #[error(transparent)]
    Cluster(#[from] TransferError),
    /// This request followed another fetch of the same blob on this node, which failed.
    #[error("{0}")]
    Followed(&'static str),
}

impl FetchError {
    /// The cluster's lie, if that is what failed the fetch.
    pub fn lie(&self) -> Option<&TransferError> {
        match self {
            FetchError::Cluster(e @ TransferError::Lied { .. }) => Some(e),
            _ => None,
        }
    }
}

impl From<reqwest::Error> for FetchError {
    fn from(e: reqwest::Error) -> Self {
        FetchError::Upstream(e.to_string())
    }
}

/// Gets a blob from upstream into the local store (the cluster coordinator implements it). `url` is checked
/// against the configured upstreams by the implementation: peers cannot make us fetch anything.
pub trait Fetcher: Send + Sync + 'static {
    fn fetch(
        &self,
        digest: Digest,
        url: String,
        authorization: Option<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), FetchError>> + Send + '_>>;
    /// Gets one part of the blob (`wire::Part`) from upstream into the store; done when this
    /// node holds that part's pieces.
    fn fetch_part(
        &self,
        digest: Digest,
        part: Part,
        url: String,
        authorization: Option<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), FetchError>> + Send + '_>>;
}

/// What the peer server answers from besides the store, given at [`Transfer::serve`].
#[derive(Default)]
pub struct Handler {
    /// Runs peers' `Fetch` and `FetchPart` requests (the cluster coordinator's upstream path); without it
    /// they are answered "this node cannot fetch".
    pub fetcher: Option<Arc<dyn Fetcher>>,
    /// The node's containerd content store: its blobs are served, straight from containerd's
    /// files, when the store does not hold them.
    pub containerd: Option<Arc<ContainerdContent>>,
}

#[derive(Clone, Debug)]
pub struct TransferConfig {
    pub listen: SocketAddr,
    pub node_id: String,
    pub secret: Vec<u8>,
    /// Streams a peer may have open to us at once (requests in flight).
    pub max_streams_per_peer: u32,
    /// Bound on connecting to a peer (a dead peer must not stall a pull).
    pub dial_timeout: Duration,
    /// Bound on a manifest answer.
    pub manifest_timeout: Duration,
    pub swarm: SwarmConfig,
    /// Upload rate limit to peers in bytes/s (None: unlimited).
    pub upload_limit: Option<u64>,
    /// Download rate limit from peers in bytes/s (None: unlimited).
    pub download_limit: Option<u64>,
    /// Piece data on the bulk channel (TLS on TCP at the same port, `bulk`), QUIC for the rest;
    /// false: everything on QUIC, and no TCP port is opened.
    pub bulk: bool,
}

impl TransferConfig {
    pub fn new(listen: SocketAddr, node_id: String, secret: Vec<u8>) -> Self {
        Self {
            listen,
            node_id,
            secret,
            max_streams_per_peer: 32,
            dial_timeout: Duration::from_secs(2),
            manifest_timeout: Duration::from_secs(1),
            swarm: SwarmConfig::default(),
            upload_limit: None,
            download_limit: None,
            bulk: true,
        }
    }
}

/// Reason-coded counters.
#[derive(Default, Debug)]
pub struct Counters {
    pub bytes_to_peers: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    pub pieces_from_peers: AtomicU64,
    pub corrupt_pieces: AtomicU64,
    pub peer_timeouts: AtomicU64,
    /// Piece requests duplicated to a second peer in the endgame (the first was slow).
    pub hedged_requests: AtomicU64,
    pub peer_errors: AtomicU64,
    /// Dials that failed and connections that timed out (the peer is skipped for a moment).
    pub peers_unreachable: AtomicU64,
    pub refused_requests: AtomicU64,
    pub fetches_for_peers: AtomicU64,
    /// Parts of blobs fetched from upstream for the node splitting the blob (`FetchPart`).
    pub part_fetches_for_peers: AtomicU64,
    /// Piece requests this node, as a blob's origin, answered "not here" because it had just
    /// sent those pieces to another peer (`handout`).
    pub withheld_pieces: AtomicU64,
}

impl crate::metrics::MetricsSource for Transfer {
    fn render(&self, r: &mut prometheus_client::registry::Registry) {
        use crate::metrics::counter;
        let c = &self.inner.counters;
        counter(r, "peer_received_bytes", "Bytes received from peers", &c.bytes_from_peers);
        counter(r, "peer_sent_bytes", "Bytes sent to peers", &c.bytes_to_peers);
        counter(r, "peer_pieces", "Verified pieces received from peers", &c.pieces_from_peers);
        counter(r, "piece_verification_failures", "Pieces from peers that failed blake3 verification", &c.corrupt_pieces);
        counter(r, "peer_timeouts", "Piece requests to peers that timed out", &c.peer_timeouts);
        counter(r, "peer_hedged_requests", "Piece requests duplicated to a second peer in the endgame (the first was slow)", &c.hedged_requests);
        counter(r, "peer_withheld_pieces", "Piece requests refused as a blob's origin: the pieces had just gone to another peer", &c.withheld_pieces);
        counter(r, "peer_errors", "Piece requests to peers that failed", &c.peer_errors);
        counter(r, "peers_unreachable", "Dials that failed and peer connections that timed out", &c.peers_unreachable);
        counter(r, "peer_refused", "Peer connections or requests refused (no cluster certificate, malformed)", &c.refused_requests);
        counter(r, "peer_fetches", "Upstream fetches done for peers as rendezvous owner", &c.fetches_for_peers);
        counter(r, "peer_part_fetches", "Parts of split blobs fetched from upstream for the node that split them", &c.part_fetches_for_peers);
        let b = &self.inner.bulk_counters;
        counter(r, "peer_bulk_requests", "Piece requests answered over the bulk channel (TLS on TCP), sent or served", &b.requests);
        counter(r, "peer_bulk_fallbacks", "Piece requests sent over QUIC because the peer's bulk channel could not be reached", &b.fallbacks);
        counter(r, "peer_bulk_refused", "Bulk channel connections refused (no cluster certificate, over the limits, not a piece request, malformed)", &b.refused);
        counter(r, "peer_bulk_broken", "Bulk channel connections that broke with answers outstanding (reset, stalled, malformed)", &b.broken);
    }
}

#[derive(Clone)]
pub struct Transfer {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: TransferConfig,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    store: Store,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// Peers whose dial failed or whose connection timed out, until when they are not dialled
    /// again: a dead peer costs every request to it a failed dial otherwise.
    down: Mutex<HashMap<SocketAddr, Instant>>,
    /// Manifests of blobs being downloaded from peers, so this node serves the pieces it already
    /// has to others while it fetches the rest.
    partial: Mutex<HashMap<Digest, Arc<WireManifest>>>,
    upload: Option<Arc<RateLimit>>,
    download: Option<Arc<RateLimit>>,
    /// Which peer got each fresh piece of the blobs this node is fetching from upstream.
    handout: Mutex<handout::Handout>,
    counters: Counters,
    /// The bulk channel's client (None: `TransferConfig::bulk` off).
    bulk: Option<bulk::Client>,
    /// Its listener and TLS configuration until `serve` starts it (None: off, or the TCP port
    /// was taken: peers then ask this node over QUIC).
    bulk_server: Mutex<Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>>,
    bulk_counters: Arc<bulk::BulkCounters>,
    /// Whether the bulk channel's TCP port was opened.
    bulk_listening: bool,
}

/// How long a fresh piece the origin sent to one peer is withheld from the others (`handout`):
/// enough for that peer to store it and for the others to see it in its bitfield (polled every
/// 100 ms) several times over, short enough that a taker that died costs little.
pub const HANDOUT_GRACE: Duration = Duration::from_secs(3);

/// Silence on a connection after which the peer counts as dead (module docs of `start`). Long
/// enough that a live peer whose CPU is saturated (every node busiest exactly when every node
/// pulls the same image) is not taken for dead: a false suspicion sends work elsewhere and can
/// fetch a blob from upstream twice, while a dead peer's pieces are hedged away from it by the
/// swarm long before this fires.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// How long a peer that could not be reached is not dialled again (requests fail at once).
const DOWN_FOR: Duration = Duration::from_secs(2);

/// How long a manifest request waits for its holder before the next holder is asked as well.
const MANIFEST_HEDGE: Duration = Duration::from_millis(50);

fn to_hash(h: &[u8; 32]) -> blake3::Hash {
    blake3::Hash::from_bytes(*h)
}

impl Transfer {
    /// Binds the QUIC endpoint and starts serving peers.
    pub fn start(cfg: TransferConfig, store: Store) -> Result<Self, TransferError> {
        let identity = tls::Identity::new(&cfg.secret, &cfg.node_id)?;
        let mut server = identity.server_config()?;
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(cfg.max_streams_per_peer.into());
        transport.max_concurrent_uni_streams(0u32.into());
        // A peer that died (or stopped being scheduled) is noticed by the idle timeout alone when
        // peers are static: keep-alives make silence mean death within IDLE_TIMEOUT (quinn
        // stretches it to 3 PTOs when round trips are long, so a busy node is not declared dead).
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(|_| TransferError::Peer { peer: cfg.listen, msg: "idle timeout".into() })?));
        // Room for a few 1 MiB pieces in flight per stream and per connection.
        transport.stream_receive_window((4u32 << 20).into());
        transport.receive_window((32u32 << 20).into());
        transport.send_window(32 << 20);
        // BBR paces instead of filling queues until loss (Cubic filled the 50 ms link queues in
        // bench swarm, delaying the TCP ACKs of the origin's own upstream download); the
        // aggregation allowance keeps it from starving when ACKs come late (`congestion`).
        transport.congestion_controller_factory(Arc::new(congestion::AggregationBbrConfig::default()));
        // Tried and dropped (bench swarm, N=4, back to back): streams in write order instead of
        // round-robin, ACK frequency 1 in 8, a 1472-byte MTU bound: slower (1.8x vs 1.6x S/B);
        // write order again with requests and bitfields at a higher priority: no change.
        // Jumbo frames (links at MTU 9000, packets fixed at 8952 bytes, N=8): agents' CPU -28%
        // but 1.60x vs 1.38x S/B (jumbo packets lost, windows of 7-15 packets); N=16, CPU-bound:
        // 2.04x vs 2.10x. Path MTU discovery there fell back to 1200 bytes for a minute at
        // congestion losses (quinn's black-hole detection).
        let transport = Arc::new(transport);
        server.transport_config(transport.clone());
        let mut client = identity.client_config()?;
        client.transport_config(transport);
        let endpoint = {
            let bind = |source| TransferError::Bind { addr: cfg.listen, source };
            let socket = std::net::UdpSocket::bind(cfg.listen).map_err(bind)?;
            socket_buffers(&socket, SOCKET_BUFFER);
            let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime).map_err(bind)?
        };
        let upload = cfg.upload_limit.map(RateLimit::new);
        let download = cfg.download_limit.map(RateLimit::new);
        let bulk_counters = Arc::new(bulk::BulkCounters::default());
        let (bulk, bulk_server) = if cfg.bulk {
            // TCP at the port the UDP socket got (the same number when --peer-addr names one).
            let at = endpoint.local_addr().unwrap_or(cfg.listen);
            let client = bulk::Client::new(&identity, at.port(), cfg.dial_timeout, bulk_counters.clone())?;
            let server = match std::net::TcpListener::bind(at).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
                Ok(l) => Some((l, identity.bulk_server_config()?)),
                Err(e) => {
                    warn!(%at, "bulk channel not opened (peers ask this node over QUIC): {e}");
                    None
                }
            };
            (Some(client), server)
        } else {
            (None, None)
        };
        let t = Transfer {
            inner: Arc::new(Inner {
                cfg,
                endpoint,
                client,
                store,
                conns: Mutex::new(HashMap::new()),
                down: Mutex::new(HashMap::new()),
                partial: Mutex::new(HashMap::new()),
                upload,
                download,
                handout: Mutex::new(handout::Handout::new(HANDOUT_GRACE)),
                counters: Counters::default(),
                bulk,
                bulk_listening: bulk_server.is_some(),
                bulk_server: Mutex::new(bulk_server),
                bulk_counters,
            }),
        };
        Ok(t)
    }

    /// Starts answering peers, with `handler` for what the store does not hold. Until then the
    /// endpoint only dials out (the handler is usually built from parts that need this
    /// `Transfer` first: the mirror's cluster fetch path).
    pub fn serve(&self, handler: Handler) {
        let server = self.clone();
        let handler = Arc::new(handler);
        let bulk_server = self.inner.bulk_server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((listener, tls)) = bulk_server {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let pieces = Arc::new(BulkPieces { transfer: self.clone(), handler: handler.clone() });
                    tokio::spawn(bulk::serve(listener, tls, pieces, self.inner.bulk_counters.clone()));
                }
                Err(e) => warn!("bulk channel not served (peers ask this node over QUIC): {e}"),
            }
        }
        tokio::spawn(async move { server.accept_loop(handler).await });
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// How piece data travels (`peerd status`): the transport ("tcp" or "quic"), whether the
    /// bulk channel's port is open, piece requests over it, and requests that fell back to QUIC.
    pub fn peer_data(&self) -> (&'static str, bool, u64, u64) {
        let b = &self.inner.bulk_counters;
        let transport = if self.inner.bulk.is_some() { "tcp" } else { "quic" };
        (transport, self.inner.bulk_listening, b.requests.load(Ordering::Relaxed), b.fallbacks.load(Ordering::Relaxed))
    }

    async fn accept_loop(&self, handler: Arc<Handler>) {
        while let Some(incoming) = self.inner.endpoint.accept().await {
            let this = self.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        // Includes peers without a cluster certificate.
                        this.inner.counters.refused_requests.fetch_add(1, Ordering::Relaxed);
                        debug!("peer handshake failed: {e}");
                        return;
                    }
                };
                let peer = conn.remote_address();
                trace_path(&conn, "served");
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let this = this.clone();
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.serve_stream(&handler, peer, send, recv).await {
                            debug!(%peer, "stream: {e}");
                        }
                    });
                }
            });
        }
    }

    async fn serve_stream(&self, h: &Handler, peer: SocketAddr, mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), String> {
        let raw = recv.read_to_end(wire::MAX_REQUEST).await.map_err(|e| e.to_string())?;
        let req = match Request::decode(&raw) {
            Ok(r) => r,
            Err(e) => {
                self.inner.counters.refused_requests.fetch_add(1, Ordering::Relaxed);
                let _ = send.write_all(&wire::status_frame(Status::BadRequest, &e.to_string())).await;
                let _ = send.finish();
                return Err(e.to_string());
            }
        };
        let store = &self.inner.store;
        match req {
            Request::Manifest { digest: d } => {
                let m = match self.containerd_manifest(h, &d, true).await {
                    Some(m) => Some(Arc::new(WireManifest::from(&*m))),
                    None => self.manifest_of(&d),
                };
                let frame = match m {
                    Some(m) => m.encode(),
                    None => wire::status_frame(Status::NotFound, "not here"),
                };
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
            }
            Request::Pieces { digest, first, count } => {
                if self.send_pieces(h, peer, digest, first, count, &mut send).await? {
                    send.finish().map_err(|e| e.to_string())?;
                    let _ = send.stopped().await;
                }
                return Ok(());
            }
            Request::VerifiedManifest { digest: d } => {
                // Complete and sha256-verified here only: never a manifest of pieces in flight.
                let m = match store.manifest(&d) {
                    Some(m) => Some(m),
                    None => self.containerd_manifest(h, &d, true).await.map(|m| (*m).clone()),
                };
                let frame = match m {
                    Some(m) => WireManifest::from(&m).encode(),
                    None => wire::status_frame(Status::NotFound, "not complete here"),
                };
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
            }
            Request::Have { digest: d } => {
                let frame = match self.containerd_manifest(h, &d, false).await {
                    Some(m) => wire::encode_have(&vec![true; m.pieces.len()]),
                    None => match (self.manifest_of(&d), store.present_pieces(&d)) {
                        (Some(_), Some(mut bits)) => {
                            if let Some(mut h) = self.handout(&d) {
                                let fresh = store.upstream_pieces(&d).unwrap_or_default();
                                h.mask(&d, peer, &mut bits, &fresh, Instant::now());
                            }
                            wire::encode_have(&bits)
                        }
                        _ => wire::status_frame(Status::NotFound, "not here"),
                    },
                };
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
            }
            Request::Fetch { digest: d, url, authorization } => {
                self.inner.counters.fetches_for_peers.fetch_add(1, Ordering::Relaxed);
                let frame = self.fetch_for_peer(h, |f| f.fetch(d, url, authorization)).await;
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
            }
            Request::FetchPart { digest: d, part, url, authorization } => {
                self.inner.counters.part_fetches_for_peers.fetch_add(1, Ordering::Relaxed);
                let frame = self.fetch_for_peer(h, |f| f.fetch_part(d, part, url, authorization)).await;
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
            }
        }
        send.finish().map_err(|e| e.to_string())?;
        let _ = send.stopped().await;
        Ok(())
    }

    /// Answers a `Pieces` request into `out` (a QUIC stream or the bulk channel): the pieces,
    /// or a refusal. `Ok(true)`: an `Ok` answer was sent whole; `Ok(false)`: refused (a QUIC
    /// stream is finished then).
    async fn send_pieces<S: PieceSink>(&self, h: &Handler, peer: SocketAddr, d: Digest, first: u32, count: u32, out: &mut S) -> Result<bool, String> {
        let store = &self.inner.store;
        if let (Some(m), Some(c)) = (self.containerd_manifest(h, &d, false).await, h.containerd.as_ref()) {
            if first.checked_add(count).is_none_or(|end| end as usize > m.pieces.len()) {
                return out.refuse(Status::BadRequest, "pieces out of range").await;
            }
            // Read and checked before the status goes out: a file that changed since it
            // was verified is answered "not found" (and withdrawn), never sent.
            let pieces = match c.read_pieces(&d, first, count).await {
                Ok(p) => p,
                Err(e) => {
                    debug!(%d, "not serving from containerd: {e}");
                    return out.refuse(Status::NotFound, "not here").await;
                }
            };
            out.ok().await?;
            for bytes in pieces {
                let len = bytes.len() as u64;
                self.send_limited(Bytes::from(bytes), out).await?;
                self.inner.counters.bytes_to_peers.fetch_add(len, Ordering::Relaxed);
            }
            return Ok(true);
        }
        let (Some(m), Some(_pin)) = (self.manifest_of(&d), store.pin(&d)) else {
            return out.refuse(Status::NotFound, "not here").await;
        };
        let n = m.pieces.len() as u32;
        if first.checked_add(count).is_none_or(|end| end > n) {
            return out.refuse(Status::BadRequest, "pieces out of range").await;
        }
        // Only pieces verified here (durable soon after); anything else is "not yet".
        let have = store.present_pieces(&d).unwrap_or_default();
        if (first..first + count).any(|i| !have.get(i as usize).copied().unwrap_or(false)) {
            return out.refuse(Status::NotFound, "not yet").await;
        }
        let given = self.handout(&d).is_none_or(|mut h| {
            let fresh = store.upstream_pieces(&d).unwrap_or_default();
            h.claim(&d, &fresh, peer, first, count, Instant::now())
        });
        if !given {
            self.inner.counters.withheld_pieces.fetch_add(1, Ordering::Relaxed);
            return out.refuse(Status::NotFound, "sent to another peer; get it there").await;
        }
        out.ok().await?;
        for i in first..first + count {
            let len = m.piece_len(i);
            // A fresh piece comes from the store's memory, an older one from the file.
            let bytes = store.read_piece(&d, i as usize).await.map_err(|e| e.to_string())?;
            self.send_limited(bytes, out).await?;
            self.inner.counters.bytes_to_peers.fetch_add(len, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Sends one piece within `--upload-limit`, in slices: a whole piece's tokens taken at once
    /// would hold the piece back for seconds at low limits, longer than a receiver waits for
    /// progress (`bulk::STALL`).
    async fn send_limited<S: PieceSink>(&self, bytes: Bytes, out: &mut S) -> Result<(), String> {
        const SLICE: usize = 64 << 10;
        let Some(l) = &self.inner.upload else {
            return out.piece(bytes).await;
        };
        let mut at = 0;
        while at < bytes.len() {
            let n = SLICE.min(bytes.len() - at);
            l.take(n as u64).await;
            out.piece(bytes.slice(at..at + n)).await?;
            at += n;
        }
        Ok(())
    }

    /// Runs a peer's Fetch or FetchPart through the fetcher; the answer frame.
    async fn fetch_for_peer<'a>(&'a self, h: &'a Handler, job: impl FnOnce(&'a dyn Fetcher) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), FetchError>> + Send + 'a>>) -> Bytes {
        match &h.fetcher {
            None => wire::status_frame(Status::UpstreamFailed, "this node cannot fetch"),
            Some(f) => match job(f.as_ref()).await {
                Ok(()) => wire::status_frame(Status::Ok, ""),
                Err(e) => wire::status_frame(Status::UpstreamFailed, &e.to_string()),
            },
        }
    }

    /// The hand-out record (`handout`) when this node is the origin of `d` (still fetching it
    /// from upstream), without blobs that have stopped arriving; `None` otherwise: pieces of
    /// other blobs go to whoever asks, bitfields unmasked.
    fn handout(&self, d: &Digest) -> Option<std::sync::MutexGuard<'_, handout::Handout>> {
        let store = &self.inner.store;
        if !store.arriving_from_upstream(d) {
            return None;
        }
        let mut h = self.inner.handout.lock().unwrap_or_else(|e| e.into_inner());
        h.retain(|d| store.arriving_from_upstream(d));
        Some(h)
    }

    /// The manifest of `d` from the node's containerd content store, when the store does not hold
    /// `d` complete (the store's copy is preferred: no file outside our control is read).
    /// Verification starts on first use; with `wait` the answer waits for it briefly (less than a
    /// peer's manifest timeout: a peer gets "not found" and goes elsewhere rather than timing out;
    /// the hashing goes on and the next request finds it ready).
    async fn containerd_manifest(&self, h: &Handler, d: &Digest, wait: bool) -> Option<Arc<crate::store::Manifest>> {
        let verify_wait = self.inner.cfg.manifest_timeout * 3 / 5;
        let c = h.containerd.as_ref()?;
        if !c.contains(d) || self.inner.store.has(d) {
            return None;
        }
        if wait {
            tokio::time::timeout(verify_wait, c.manifest(d)).await.ok()?.ok()
        } else {
            c.prepare(d);
            c.cached_manifest(d)
        }
    }

    /// The manifest of a complete blob, or of one being downloaded from peers.
    fn manifest_of(&self, d: &Digest) -> Option<Arc<WireManifest>> {
        if let Some(m) = self.inner.store.manifest(d) {
            return Some(Arc::new(WireManifest::from(&m)));
        }
        if let Some(m) = self.inner.partial.lock().unwrap_or_else(|e| e.into_inner()).get(d).cloned() {
            return Some(m);
        }
        // A blob arriving from upstream piece by piece: the hashes of the pieces so far (zero for
        // the rest). Receivers fetch only pieces whose hash they know.
        let (size, piece_size, hashes) = self.inner.store.known_hashes(d)?;
        Some(Arc::new(WireManifest { size, piece_size, pieces: hashes.iter().map(|h| h.map_or([0; 32], |h| *h.as_bytes())).collect() }))
    }

    /// A peer's bitfield for `d`, bounded by the manifest timeout.
    async fn have(&self, peer: SocketAddr, d: &Digest, pieces: usize) -> Option<Vec<bool>> {
        tokio::time::timeout(self.inner.cfg.manifest_timeout, async {
            let (st, mut recv) = self.exchange(peer, &Request::Have { digest: *d }).await.ok()?;
            if st != Status::Ok {
                return None;
            }
            let body = recv.read_to_end(8 + pieces.div_ceil(8)).await.ok()?;
            wire::decode_have(&body, pieces).ok()
        })
        .await
        .ok()
        .flatten()
    }

    /// A connection to `peer`, reused while alive; dialing is bounded by `dial_timeout`.
    async fn connect(&self, peer: SocketAddr) -> Result<quinn::Connection, TransferError> {
        if let Some(c) = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner()).get(&peer) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        if let Some(until) = self.inner.down.lock().unwrap_or_else(|e| e.into_inner()).get(&peer) {
            if Instant::now() < *until {
                return Err(TransferError::Unreachable { peer, msg: "did not answer a moment ago".into() });
            }
        }
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client.clone(), peer, tls::SERVER_NAME)
            .map_err(|e| TransferError::Peer { peer, msg: e.to_string() })?;
        let conn = match tokio::time::timeout(self.inner.cfg.dial_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.unreachable(peer, e.to_string())),
            Err(_) => return Err(self.unreachable(peer, format!("no handshake within {:?}", self.inner.cfg.dial_timeout))),
        };
        trace_path(&conn, "dialled");
        self.inner.down.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer);
        self.inner.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, conn.clone());
        Ok(conn)
    }

    /// Whether `peer` failed to answer a moment ago (`DOWN_FOR`): the mirror skips it when picking
    /// a blob's owner instead of waiting for a dial that will fail.
    pub fn is_down(&self, peer: SocketAddr) -> bool {
        self.inner.down.lock().unwrap_or_else(|e| e.into_inner()).get(&peer).is_some_and(|until| Instant::now() < *until)
    }

    /// Records that `peer` is gone for `DOWN_FOR` and returns the error saying so.
    fn unreachable(&self, peer: SocketAddr, msg: String) -> TransferError {
        self.inner.counters.peers_unreachable.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, "peer unreachable, not dialled for {DOWN_FOR:?}: {msg}");
        self.inner.down.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, Instant::now() + DOWN_FOR);
        TransferError::Unreachable { peer, msg }
    }

    /// One request/answer exchange; returns the status and the receive stream for the body.
    async fn exchange(&self, peer: SocketAddr, req: &Request) -> Result<(Status, quinn::RecvStream), TransferError> {
        let conn = self.connect(peer).await?;
        // A connection that timed out means the peer is gone; other errors are this request's.
        let err = |msg: String| match conn.close_reason() {
            Some(quinn::ConnectionError::TimedOut) => self.unreachable(peer, msg),
            Some(_) => TransferError::Unreachable { peer, msg },
            None => TransferError::Peer { peer, msg },
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        let frame = req.encode().map_err(|e| err(e.to_string()))?;
        send.write_all(&frame).await.map_err(|e| err(e.to_string()))?;
        send.finish().map_err(|e| err(e.to_string()))?;
        let mut st = [0u8; 1];
        recv.read_exact(&mut st).await.map_err(|e| err(e.to_string()))?;
        let status = Status::from_u8(st[0]).ok_or_else(|| err(format!("unknown status {}", st[0])))?;
        Ok((status, recv))
    }

    async fn status_message(recv: &mut quinn::RecvStream) -> String {
        recv.read_to_end(4096).await.ok().and_then(|b| b.get(2..).map(|m| String::from_utf8_lossy(m).into_owned())).unwrap_or_default()
    }

    /// The manifest of `d` from the first of `holders` to answer, in their order: a holder that
    /// has not answered within `MANIFEST_HEDGE` (dead, not yet dialled, busy) is hedged by asking
    /// the next as well, and a refusal moves on at once, so one silent peer costs tens of
    /// milliseconds, not the dial or manifest timeout.
    async fn manifest_from(&self, d: &Digest, holders: &[SocketAddr]) -> Option<(SocketAddr, WireManifest)> {
        self.manifest_of_kind(d, holders, false).await
    }

    /// The manifest of `d` from the first of `holders` that holds it complete and verified
    /// (`VerifiedManifest`), hedged like `manifest_from`.
    pub async fn verified_manifest(&self, d: &Digest, holders: &[SocketAddr]) -> Option<(SocketAddr, WireManifest)> {
        self.manifest_of_kind(d, holders, true).await
            .filter(|(_, m)| m.piece_size == self.inner.store.piece_size() && m.pieces.iter().all(|h| *h != [0; 32]))
    }

    async fn manifest_of_kind(&self, d: &Digest, holders: &[SocketAddr], verified: bool) -> Option<(SocketAddr, WireManifest)> {
        let mut asks = tokio::task::JoinSet::new();
        let mut next = holders.iter().copied();
        let ask = |asks: &mut tokio::task::JoinSet<_>, peer: SocketAddr| {
            let (this, d) = (self.clone(), *d);
            asks.spawn(async move {
                let m = tokio::time::timeout(this.inner.cfg.manifest_timeout, async {
                    let req = if verified { Request::VerifiedManifest { digest: d } } else { Request::Manifest { digest: d } };
                    let (st, mut recv) = this.exchange(peer, &req).await.ok()?;
                    if st != Status::Ok {
                        return None;
                    }
                    let body = recv.read_to_end(17 + wire::MAX_MANIFEST_PIECES as usize * 32).await.ok()?;
                    WireManifest::decode(&body).ok()
                })
                .await;
                (peer, m.ok().flatten())
            });
        };
        ask(&mut asks, next.next()?);
        loop {
            let answer = tokio::select! {
                a = asks.join_next() => a,
                _ = tokio::time::sleep(MANIFEST_HEDGE) => {
                    // Nothing yet: ask the next holder too (the earlier asks keep going).
                    if let Some(peer) = next.next() {
                        ask(&mut asks, peer);
                    }
                    continue;
                }
            };
            match answer {
                Some(Ok((peer, Some(m)))) => return Some((peer, m)),
                // Refused, failed or timed out: the next holder now.
                Some(_) => match next.next() {
                    Some(peer) => ask(&mut asks, peer),
                    None if asks.is_empty() => return None,
                    None => {}
                },
                None => return None,
            }
        }
    }

    /// Gets pieces `pieces` of `d` into the store from `peers`, each checked against `m` (a
    /// verified manifest: `verified_manifest`) before it is stored: a range read's pieces, not
    /// the whole blob. Runs of up to `MAX_PIECES_PER_REQUEST` pieces go out at once to different
    /// peers; a run a peer cannot give (gone, "not here", bad bytes) goes to the next.
    pub async fn fetch_pieces(&self, d: &Digest, m: &Arc<WireManifest>, peers: &[SocketAddr], pieces: std::ops::Range<u32>) -> Result<(), TransferError> {
        let store = &self.inner.store;
        store.declare(d, m.size).await?;
        let _pin = store.pin(d);
        let have = store.present_pieces(d).unwrap_or_default();
        let missing: Vec<u32> = pieces.filter(|i| !have.get(*i as usize).copied().unwrap_or(false)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if peers.is_empty() {
            return Err(TransferError::NoPeer(*d));
        }
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for i in missing {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == i && *count < wire::MAX_PIECES_PER_REQUEST => *count += 1,
                _ => runs.push((i, 1)),
            }
        }
        let mut jobs = tokio::task::JoinSet::new();
        for (k, (first, count)) in runs.into_iter().enumerate() {
            let (this, d, m, peers) = (self.clone(), *d, m.clone(), peers.to_vec());
            jobs.spawn(async move {
                for attempt in 0..peers.len() {
                    let peer = peers[(k + attempt) % peers.len()];
                    let Ok(got) = this.get_pieces(peer, &d, &m, Assignment { peer: 0, first, count }).await else { continue };
                    let mut ok = true;
                    for (i, bytes) in got {
                        match this.inner.store.put_piece(&d, i as usize, bytes, to_hash(&m.pieces[i as usize]), Source::Peer(peer.to_string())).await {
                            Ok(_) => {}
                            Err(StoreError::PieceMismatch { .. }) => {
                                this.inner.counters.corrupt_pieces.fetch_add(1, Ordering::Relaxed);
                                ok = false;
                                break;
                            }
                            Err(e) => return Err(TransferError::Store(e)),
                        }
                    }
                    if ok {
                        return Ok(());
                    }
                }
                Err(TransferError::NoPeer(d))
            });
        }
        while let Some(r) = jobs.join_next().await {
            r.unwrap_or(Err(TransferError::NoPeer(*d)))?;
        }
        Ok(())
    }

    /// Asks `owner` to fetch `d` from upstream (with the client's credentials); returns when the
    /// owner holds the verified blob, or fails (the caller tries the next owner or upstream).
    pub async fn ask_fetch(&self, owner: SocketAddr, d: &Digest, url: &str, authorization: Option<&str>, within: Duration) -> Result<(), TransferError> {
        let req = Request::Fetch { digest: *d, url: url.to_string(), authorization: authorization.map(str::to_owned) };
        self.ask(owner, req, within).await
    }

    /// Asks `peer` to fetch `part` of `d` from upstream; returns when it holds that part.
    pub async fn ask_fetch_part(&self, peer: SocketAddr, d: &Digest, part: Part, url: &str, authorization: Option<&str>, within: Duration) -> Result<(), TransferError> {
        let req = Request::FetchPart { digest: *d, part, url: url.to_string(), authorization: authorization.map(str::to_owned) };
        self.ask(peer, req, within).await
    }

    async fn ask(&self, owner: SocketAddr, req: Request, within: Duration) -> Result<(), TransferError> {
        let res = tokio::time::timeout(within, async {
            let (st, mut recv) = self.exchange(owner, &req).await?;
            if st == Status::Ok {
                Ok(())
            } else {
                Err(TransferError::Peer { peer: owner, msg: format!("fetch refused ({st:?}): {}", Self::status_message(&mut recv).await) })
            }
        })
        .await;
        res.unwrap_or_else(|_| Err(TransferError::Peer { peer: owner, msg: format!("no fetch answer within {within:?}") }))
    }

    /// Downloads `d` from `peers` (address, same zone) into the store, piece by piece, each
    /// piece checked against the manifest's blake3 and the whole blob against its sha256 at the
    /// end. Peers may hold the whole blob or only part of it (they are downloading too): their
    /// bitfields are refreshed every `have_every` or few, and this node serves its own verified pieces to
    /// them meanwhile. Fails if no peer has a manifest, or nothing can progress for `SwarmConfig::stall`.
    pub async fn download(&self, d: &Digest, peers: &[(SocketAddr, bool)]) -> Result<(), TransferError> {
        self.download_with_origins(d, peers, 1).await
    }

    /// `download`, with the first `origins` peers each receiving part of the blob from upstream
    /// (a split fetch: each is asked only for what nobody else has, as the single owner is).
    pub async fn download_with_origins(&self, d: &Digest, peers: &[(SocketAddr, bool)], origins: usize) -> Result<(), TransferError> {
        if self.inner.store.has(d) {
            return Ok(());
        }
        let addrs: Vec<SocketAddr> = peers.iter().map(|h| h.0).collect();
        let (manifest_peer, m) = self.manifest_from(d, &addrs).await.ok_or(TransferError::NoPeer(*d))?;
        let store = &self.inner.store;
        let ours = store.piece_size();
        if m.piece_size != ours {
            return Err(TransferError::PieceSize { digest: *d, theirs: m.piece_size, ours });
        }
        store.declare(d, m.size).await?;
        // Not evicted while it downloads.
        let _pin = store.pin(d);
        let m = Arc::new(m);
        if m.pieces.iter().all(|h| *h != [0; 32]) {
            self.inner.partial.lock().unwrap_or_else(|e| e.into_inner()).insert(*d, m.clone());
        }
        // Removed however the download ends, including when its caller drops it (a timeout).
        struct Partial<'a>(&'a Inner, Digest);
        impl Drop for Partial<'_> {
            fn drop(&mut self) {
                self.0.partial.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
            }
        }
        let _partial = Partial(&self.inner, *d);
        self.swarm(d, &m, manifest_peer, peers, origins).await
    }

    async fn swarm(&self, d: &Digest, m: &Arc<WireManifest>, manifest_peer: SocketAddr, peers: &[(SocketAddr, bool)], origins: usize) -> Result<(), TransferError> {
        // When to poll bitfields and when to give up are the sans-IO machine's decisions
        // (`Download::bitfield_polls`, `gave_up`); this loop does the I/O they ask for.
        let store = &self.inner.store;
        let n = m.pieces.len();
        // A different piece order on every node, so nodes downloading together hold different
        // pieces early and can trade them.
        let mut cfg = self.inner.cfg.swarm.clone();
        let mut h = blake3::Hasher::new();
        h.update(self.inner.cfg.node_id.as_bytes());
        h.update(&self.inner.cfg.listen.to_string().into_bytes());
        h.update(d.as_bytes());
        cfg.seed = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or([1; 8]));
        let mut dl = Download::new(n as u32, cfg);
        let addrs: Vec<SocketAddr> = peers.iter().map(|&(a, zone)| {
            dl.add_partial_peer(zone);
            a
        }).collect();
        if addrs.len() == 1 {
            dl.in_blob_order();
        }
        // The first source is the owner (still receiving from upstream) or a complete holder:
        // while incomplete it is asked only for what nobody else has, and it decides who gets
        // which fresh piece (`handout`).
        for i in 0..origins.max(1) {
            dl.set_origin(i);
        }
        let (tx, mut rx) = mpsc::channel::<(Assignment, Result<Vec<(u32, Vec<u8>)>, Failure>)>(64);
        let (have_tx, mut have_rx) = mpsc::channel::<(usize, Vec<bool>, Option<WireManifest>)>(64);
        let (stored_tx, mut stored_rx) = mpsc::channel::<(usize, u32, Stored)>(64);
        let mut storing: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        let fatal = |e: StoreError| match e {
            // Every piece matched the manifest, the blob did not: the manifest lied.
            StoreError::DigestMismatch { .. } => {
                warn!(%manifest_peer, "{e}");
                TransferError::Lied { peer: manifest_peer, msg: e.to_string() }
            }
            e => e.into(),
        };
        // Piece hashes known so far; a manifest from a node still fetching from upstream has gaps
        // (zeros), filled in as its later manifests arrive. Pieces are only requested once their
        // hash is known, so every stored piece was checked.
        let mut hashes: Vec<Option<[u8; 32]>> = m.pieces.iter().map(|h| (*h != [0; 32]).then_some(*h)).collect();
        dl.set_known_hashes(hashes.iter().map(Option::is_some).collect());
        let mut tasks: HashMap<(usize, u32), tokio::task::JoinHandle<()>> = HashMap::new();
        let started = Instant::now();
        debug!(target: "peerd_agent::transfer::trace", peers = ?addrs, "swarm");
        // At most one manifest request at a time, and only to a peer whose bitfield shows pieces
        // with hashes we lack (a manifest is 32 bytes per piece; bitfields are 1 bit).
        let manifest_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Asks `asked` for their bitfields (and one of them for a manifest filling in `unknown`
        // hashes); the answers come back on `have_rx`.
        let refresh = |this: &Self, asked: Vec<usize>, unknown: Option<Arc<Vec<bool>>>| {
            for i in asked {
                let peer = addrs[i];
                let this = this.clone();
                let have_tx = have_tx.clone();
                let d = *d;
                let (unknown, busy) = (unknown.clone(), manifest_busy.clone());
                tokio::spawn(async move {
                    let Some(bits) = this.have(peer, &d, n).await else { return };
                    let wanted = unknown.is_some_and(|u| bits.iter().zip(u.iter()).any(|(b, u)| *b && *u));
                    let manifest = if wanted && !busy.swap(true, Ordering::AcqRel) {
                        let m = this.manifest_from(&d, &[peer]).await.map(|(_, m)| m);
                        busy.store(false, Ordering::Release);
                        m
                    } else {
                        None
                    };
                    let _ = have_tx.send((i, bits, manifest)).await;
                });
            }
        };
        let outcome = 'run: loop {
            if store.has(d) {
                break Ok(());
            }
            if dl.is_complete() {
                // Every piece is stored, but the writer of the last one may still be checking
                // the whole blob's sha256 (a duplicate of that piece reports "already present"
                // meanwhile): wait for the writers, then the blob must be complete.
                for t in storing.drain(..) {
                    let _ = t.await;
                }
                while let Ok((_, _, r)) = stored_rx.try_recv() {
                    if let Stored::Fatal(e) = r {
                        break 'run Err(fatal(e));
                    }
                }
                break if store.has(d) { Ok(()) } else { Err(TransferError::Store(StoreError::NotFound(*d))) };
            }
            if dl.is_stuck() {
                break Err(TransferError::NoPeer(*d));
            }
            let now = Instant::now();
            if let Some(asked) = dl.bitfield_polls(now) {
                // Pieces this node holds already (an earlier pass of this download, or its own
                // part of a split fetch arriving from upstream) are not asked of anyone.
                if let Some(present) = store.present_pieces(d) {
                    for (i, _) in present.iter().enumerate().filter(|(_, p)| **p) {
                        dl.on_piece(i as u32);
                    }
                }
                let unknown = dl.unknown_hashes().map(Arc::new);
                refresh(self, asked, unknown);
            }
            if dl.gave_up(now) {
                break Err(TransferError::NoPeer(*d));
            }
            for a in dl.expire(now) {
                self.inner.counters.peer_timeouts.fetch_add(1, Ordering::Relaxed);
                if let Some(t) = tasks.remove(&(a.peer, a.first)) {
                    t.abort();
                }
            }
            for a in dl.poll(now) {
                debug!(target: "peerd_agent::transfer::trace", t = started.elapsed().as_millis() as u64, peer = a.peer, piece = a.first, "ask");
                let this = self.clone();
                let peer = addrs[a.peer];
                let m = m.clone();
                let tx = tx.clone();
                let digest = *d;
                tasks.insert((a.peer, a.first), tokio::spawn(async move {
                    let r = this.get_pieces(peer, &digest, &m, a).await;
                    let _ = tx.send((a, r)).await;
                }));
            }
            let tick = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                Some((i, bits, manifest)) = have_rx.recv() => {
                    if let Some(pm) = manifest.filter(|pm| pm.size == m.size && pm.pieces.len() == n) {
                        for (h, new) in hashes.iter_mut().zip(&pm.pieces) {
                            if h.is_none() && *new != [0; 32] {
                                *h = Some(*new);
                            }
                        }
                        dl.set_known_hashes(hashes.iter().map(Option::is_some).collect());
                    }
                    debug!(target: "peerd_agent::transfer::trace", t = started.elapsed().as_millis() as u64, peer = i, bits = bits.iter().filter(|b| **b).count(), "have");
                    dl.set_have(i, bits);
                    dl.on_bitfield(i);
                }
                Some((a, r)) = rx.recv() => {
                    tasks.remove(&(a.peer, a.first));
                    debug!(target: "peerd_agent::transfer::trace", t = started.elapsed().as_millis() as u64, peer = a.peer, piece = a.first, ok = r.is_ok(), "got");
                    match r {
                        Ok(pieces) => {
                            // Verified and written off the loop, so requests keep flowing while
                            // pieces are hashed and synced; the peer is free for more meanwhile.
                            let got: Vec<u32> = pieces.iter().map(|p| p.0).collect();
                            dl.on_received(a, &got, Instant::now());
                            let jobs: Vec<(u32, Vec<u8>, Option<[u8; 32]>)> = pieces.into_iter().map(|(i, b)| (i, b, hashes[i as usize])).collect();
                            let (store, d, src, stored_tx) = (store.clone(), *d, Source::Peer(addrs[a.peer].to_string()), stored_tx.clone());
                            storing.push(tokio::spawn(async move {
                                for (i, bytes, expected) in jobs {
                                    let r = match expected {
                                        None => Stored::Skipped,
                                        Some(h) => match store.put_piece(&d, i as usize, bytes, to_hash(&h), src.clone()).await {
                                            Ok(PutOutcome::Stored | PutOutcome::Completed | PutOutcome::AlreadyPresent) => Stored::Yes,
                                            // Another writer has it claimed and reports it.
                                            Ok(PutOutcome::InFlight) => Stored::Elsewhere,
                                            Err(StoreError::PieceMismatch { .. }) => Stored::Corrupt,
                                            Err(e) => Stored::Fatal(e),
                                        },
                                    };
                                    let stop = matches!(r, Stored::Corrupt | Stored::Fatal(_));
                                    let _ = stored_tx.send((a.peer, i, r)).await;
                                    if stop {
                                        break;
                                    }
                                }
                            }));
                            storing.retain(|t| !t.is_finished());
                        }
                        Err(f) => {
                            if f != Failure::NotYet {
                                self.inner.counters.peer_errors.fetch_add(1, Ordering::Relaxed);
                            }
                            dl.on_failure(a, f);
                        }
                    }
                }
                Some((peer, i, r)) = stored_rx.recv() => {
                    debug!(target: "peerd_agent::transfer::trace", t = started.elapsed().as_millis() as u64, peer, piece = i, "stored");
                    match r {
                        Stored::Yes => dl.on_piece(i),
                        Stored::Elsewhere => {}
                        Stored::Skipped => dl.on_unstored(i),
                        Stored::Corrupt => {
                            self.inner.counters.corrupt_pieces.fetch_add(1, Ordering::Relaxed);
                            warn!(peer = %addrs[peer], %d, piece = i, "peer sent a corrupt piece; excluded");
                            dl.on_corrupt(peer);
                            dl.on_unstored(i);
                        }
                        Stored::Fatal(e) => break 'run Err(fatal(e)),
                    }
                }
                _ = tick => {}
            }
        };
        self.inner.counters.hedged_requests.fetch_add(dl.hedges().into(), Ordering::Relaxed);
        for (_, t) in tasks.drain() {
            t.abort();
        }
        for t in storing {
            t.abort();
        }
        if outcome.is_ok() {
            info!(%d, size = m.size, elapsed_ms = started.elapsed().as_millis() as u64, "downloaded from peers");
        }
        outcome
    }

    /// A whole piece of `len` bytes arrived from a peer (either channel): within
    /// `--download-limit`, and counted.
    async fn received_piece(&self, len: u64) {
        if let Some(l) = &self.inner.download {
            l.take(len).await;
        }
        self.inner.counters.bytes_from_peers.fetch_add(len, Ordering::Relaxed);
        self.inner.counters.pieces_from_peers.fetch_add(1, Ordering::Relaxed);
    }

    async fn get_pieces(&self, peer: SocketAddr, d: &Digest, m: &WireManifest, a: Assignment) -> Result<Vec<(u32, Vec<u8>)>, Failure> {
        if let Some(b) = &self.inner.bulk {
            let lens: Vec<u32> = (a.first..a.first + a.count).map(|i| m.piece_len(i) as u32).collect();
            match b.pieces(peer, d, a.first, lens).await {
                Ok(bulk::Answer::Pieces(pieces)) => {
                    let mut out = Vec::with_capacity(pieces.len());
                    for (i, bytes) in (a.first..).zip(pieces) {
                        self.received_piece(bytes.len() as u64).await;
                        out.push((i, bytes));
                    }
                    return Ok(out);
                }
                Ok(bulk::Answer::Refused(Status::NotFound)) => return Err(Failure::NotYet),
                Ok(bulk::Answer::Refused(_)) => return Err(Failure::Error),
                Err(bulk::BulkError::Broken(e)) => {
                    debug!(%peer, "bulk channel: {e}");
                    return Err(Failure::Error);
                }
                // Not reachable on TCP: over QUIC below.
                Err(bulk::BulkError::Unavailable(_)) => {}
            }
        }
        let req = Request::Pieces { digest: *d, first: a.first, count: a.count };
        let (st, mut recv) = self.exchange(peer, &req).await.map_err(|e| match e {
            TransferError::Unreachable { .. } => Failure::Unreachable,
            _ => Failure::Error,
        })?;
        match st {
            Status::Ok => {}
            Status::NotFound => return Err(Failure::NotYet),
            _ => return Err(Failure::Error),
        }
        let end = a.first + a.count;
        let mut out = Vec::with_capacity(a.count as usize);
        let (mut i, mut buf) = (a.first, Vec::with_capacity(m.piece_len(a.first) as usize));
        // read_chunks drains every chunk quinn has in one poll (read_chunk returned one
        // datagram's worth per poll, a task wake-up per packet: much more CPU in bench swarm),
        // and unlike read_exact needs no zeroed buffer: each byte is copied once, into the piece.
        let mut chunks: [Bytes; 32] = Default::default();
        while i < end {
            let got = recv
                .read_chunks(&mut chunks)
                .await
                .map_err(|e| match e {
                    quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut) => {
                        self.unreachable(peer, "connection timed out".into());
                        Failure::Unreachable
                    }
                    quinn::ReadError::ConnectionLost(_) => Failure::Unreachable,
                    _ => Failure::Error,
                })?
                .ok_or(Failure::Error)?;
            for chunk in chunks.iter_mut().take(got) {
                let chunk = std::mem::take(chunk);
                let mut rest: &[u8] = &chunk;
                while !rest.is_empty() {
                    if i >= end {
                        // More bytes than the pieces asked for.
                        return Err(Failure::Error);
                    }
                    let len = m.piece_len(i) as usize;
                    let take = (len - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if buf.len() == len {
                        self.received_piece(len as u64).await;
                        let next_len = if i + 1 < end { m.piece_len(i + 1) as usize } else { 0 };
                        out.push((i, std::mem::replace(&mut buf, Vec::with_capacity(next_len))));
                        i += 1;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Diagnostics (bench swarm's PEERD_BENCH_TRACE): a connection's path and packet counts every
/// 250 ms, from the side that `role` names.
fn trace_path(conn: &quinn::Connection, role: &'static str) {
    if !tracing::enabled!(target: "peerd_agent::transfer::trace", tracing::Level::DEBUG) {
        return;
    }
    let (c, peer) = (conn.clone(), conn.remote_address());
    tokio::spawn(async move {
        let t0 = Instant::now();
        while c.close_reason().is_none() {
            let s = c.stats();
            let p = &s.path;
            debug!(target: "peerd_agent::transfer::trace", t = t0.elapsed().as_millis() as u64, %peer, role, cwnd = p.cwnd, rtt_us = p.rtt.as_micros() as u64, lost = p.lost_packets, mtu = p.current_mtu, tx = s.udp_tx.datagrams, tx_ios = s.udp_tx.ios, rx = s.udp_rx.datagrams, rx_ios = s.udp_rx.ios, acks_tx = s.frame_tx.acks, "path");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// UDP socket buffers of the peer endpoint. The kernel's default (208 KiB) holds ~8 ms of a
/// 200 Mbit/s link: an agent that is not scheduled for longer (a busy node) drops datagrams,
/// which QUIC then resends (bench swarm, N=8 on 2 shared cores: ~4,000 datagrams dropped per
/// node and 1.27 x S received per node with the default, none and 1.05 x S with 8 MiB).
const SOCKET_BUFFER: usize = 8 << 20;

/// Sets both socket buffers to `bytes`: with CAP_NET_ADMIN past `net.core.{r,w}mem_max`
/// (SO_*BUFFORCE), else up to it. Best effort: a smaller buffer only costs resends.
fn socket_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    let set = |opt: libc::c_int| {
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) == 0 }
    };
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        if !set(force) && !set(plain) {
            debug!("could not size a peer socket buffer to {bytes} bytes");
        }
    }
}

/// What became of a received piece (reported back to the swarm loop by its store task).
enum Stored {
    Yes,
    /// Another writer holds the piece's claim (and reports it).
    Elsewhere,
    /// Its hash is not known (cannot happen: pieces are asked for only once it is).
    Skipped,
    Corrupt,
    Fatal(StoreError),
}

/// Where an answer to `Pieces` goes: a QUIC stream, or the bulk channel (`bulk::Out`).
trait PieceSink: Send {
    /// The whole answer: a refusal. Returns `Ok(false)` (nothing more to send).
    fn refuse(&mut self, status: Status, msg: &str) -> impl std::future::Future<Output = Result<bool, String>> + Send;
    /// Starts an `Ok` answer.
    fn ok(&mut self) -> impl std::future::Future<Output = Result<(), String>> + Send;
    fn piece(&mut self, bytes: Bytes) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

impl PieceSink for quinn::SendStream {
    async fn refuse(&mut self, status: Status, msg: &str) -> Result<bool, String> {
        self.write_all(&wire::status_frame(status, msg)).await.map_err(|e| e.to_string())?;
        let _ = self.finish();
        Ok(false)
    }

    async fn ok(&mut self) -> Result<(), String> {
        self.write_all(&[Status::Ok as u8]).await.map_err(|e| e.to_string())
    }

    async fn piece(&mut self, bytes: Bytes) -> Result<(), String> {
        // Handed to quinn as is (write_all would copy it into quinn's buffer).
        self.write_chunk(bytes).await.map_err(|e| e.to_string())
    }
}

impl PieceSink for bulk::Out {
    async fn refuse(&mut self, status: Status, msg: &str) -> Result<bool, String> {
        bulk::Out::refuse(self, status, msg).await.map_err(|e| e.to_string())?;
        Ok(false)
    }

    async fn ok(&mut self) -> Result<(), String> {
        bulk::Out::ok(self).await.map_err(|e| e.to_string())
    }

    async fn piece(&mut self, bytes: Bytes) -> Result<(), String> {
        bulk::Out::piece(self, &bytes).await.map_err(|e| e.to_string())
    }
}

/// The bulk channel's server: answers `Pieces` as the QUIC server does.
struct BulkPieces {
    transfer: Transfer,
    handler: Arc<Handler>,
}

impl bulk::Pieces for BulkPieces {
    async fn answer(&self, peer: SocketAddr, d: Digest, first: u32, count: u32, out: &mut bulk::Out) -> std::io::Result<()> {
        self.transfer.send_pieces(&self.handler, peer, d, first, count, out).await.map(|_| ()).map_err(std::io::Error::other)
    }
}

/// Rendezvous (highest random weight) hashing: the member that fetches `d` from upstream for the
/// whole cluster. Every node with the same membership view picks the same owner, with no leader;
/// when the owner leaves, only its digests move.
pub fn owner<'a>(d: &Digest, members: impl IntoIterator<Item = &'a SocketAddr>) -> Option<SocketAddr> {
    members.into_iter().max_by_key(|m| node_weight(d, **m)).copied()
}

/// `members` in rendezvous order for `d`, the owner first: who fetches which part of a split
/// blob, the same on every node with the same view.
pub fn ranked(d: &Digest, members: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut r = members.to_vec();
    r.sort_by_cached_key(|m| std::cmp::Reverse(node_weight(d, *m)));
    r
}

/// `blake3(digest || node's QUIC address)`: a node's rendezvous weight for blob `d`, the same on
/// every node (owner choice here, the origin's hand-out split in `handout`).
fn node_weight(d: &Digest, node: SocketAddr) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(d.as_bytes());
    h.update(node.to_string().as_bytes());
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests;
