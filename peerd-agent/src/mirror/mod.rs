//! The node's registry mirror: the OCI distribution pull API and the `/blobs/<url>` range proxy.
//!
//! request -> mirror -> store (hit) | upstream (miss). Peers (`transfer`) slot in before upstream
//! once they exist. Every cached byte a client gets was verified (the store only exposes blobs
//! whose sha256 matched); bytes relayed on a miss come straight from the origin and the last
//! chunk is held back until the whole body's sha256 matches, so a client never receives a complete
//! body with the wrong digest.

mod counters;
mod feed;
pub mod oci;
pub use peerd_http::range;
pub mod upstream;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub use crate::httpd::{Body, Handback, Stream};
pub use counters::Counters;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use sha2::Digest as _;
use tokio::{
    net::TcpListener,
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::{
    flight::{Follow, Join, SingleFlight},
    httpd,
    metrics::MetricsSource,
    admin,
    peers::PeerDirectory,
    ratelimit::RateLimit,
    store::{Digest, Source, Store},
    transfer::{self, FetchError, Transfer},
};
use oci::{Reference, Rejection, Route};
use peerd_http::parse_content_range;
use range::RangeAnswer;
pub use upstream::{Registries, Registry, Upstream};

/// Manifests above this size are refused (the spec suggests 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;
/// Every manifest media type, for upstream checks of clients that sent no Accept.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws, */*";
/// Whether a request on a redirected connection is one the mirror answers: a GET or HEAD of a
/// manifest or blob. Everything else (pushes, `/v2/`, catalog, tokens) goes to the registry as is.
fn serves_redirected(req: &Request<()>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD)
        && matches!(oci::parse(req.uri().path()), Some(Ok(Route::Blob { .. } | Route::Manifest { .. })))
}

/// The mirror answers the HTTP front end's requests (and a redirected connection's pulls).
impl httpd::Handler for Mirror {
    type Target = Registry;

    fn handle(&self, req: Request<()>, peer: SocketAddr) -> impl std::future::Future<Output = Resp> + Send {
        Mirror::handle(self, req, peer)
    }

    fn serves_redirected(&self, req: &Request<()>, _registry: &Registry) -> bool {
        serves_redirected(req)
    }

    fn handle_redirected(&self, req: Request<()>, peer: SocketAddr, registry: &Registry) -> impl std::future::Future<Output = Resp> + Send {
        Mirror::handle_redirected(self, req, peer, registry)
    }

    /// Refusals in the OCI error format, as every other answer of the mirror.
    fn refusal(&self, why: httpd::Refusal) -> Resp {
        let code = match why {
            httpd::Refusal::HeadTooLarge(_) => "TOO_LARGE",
            httpd::Refusal::Malformed(_) => "BAD_REQUEST",
            httpd::Refusal::HasBody => "UNSUPPORTED",
            httpd::Refusal::Busy => "TOO_MANY_REQUESTS",
        };
        error(why.status(), code, why.message())
    }

    fn count(&self, event: httpd::Event) {
        let c = match event {
            httpd::Event::AcceptError => &self.counters().accept_errors,
            httpd::Event::Shed => &self.counters().connections_shed,
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Error bodies relayed from upstream are cut at this size.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Mirror settings.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub registries: Registries,
    /// Extra hosts the `/blobs/` proxy may fetch from (blob storage), besides registry hosts.
    pub blob_hosts: Vec<String>,
    /// Serve cached content to any client without asking upstream (single-tenant clusters).
    pub trust_cluster: bool,
    /// How long an upstream "this credential may read this repository" answer is reused.
    pub auth_ttl: Duration,
    pub connect_timeout: Duration,
    /// Bound on waiting for an upstream response head.
    pub head_timeout: Duration,
    /// Bound on waiting for each read of an upstream body.
    pub read_timeout: Duration,
    /// Background whole-blob fetches started by range reads, at most this many at once.
    pub max_prefetches: usize,
    /// Bytes per second read from upstream, all blob bodies and relayed ranges together
    /// (`--upstream-limit`); unlimited when `None`.
    pub upstream_limit: Option<u64>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            registries: Registries::default(),
            blob_hosts: Vec::new(),
            trust_cluster: false,
            auth_ttl: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(3),
            head_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
            max_prefetches: 4,
            upstream_limit: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("building the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// What this node is and how it was set up, for `peerd status`, `/readyz` and the start log.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub node_id: String,
    pub hostname: String,
    /// `mirror` (clients pointed at it: hosts.toml) or `transparent` (eBPF redirect).
    pub mode: String,
    pub tls_intercept: bool,
    /// The peer address advertised; None for a node alone.
    pub advertised: Option<SocketAddr>,
    pub advertised_how: String,
    pub seeds: Vec<String>,
    pub seeds_resolved: usize,
    pub static_peers: usize,
    /// containerd's certs.d directory, when the node's hosts.toml files can be read (the chart
    /// mounts it): registries whose hosts.toml names this mirror are cached that way.
    pub hosts_toml_dir: Option<PathBuf>,
    /// The mirror's listen port, to recognise this mirror in a hosts.toml.
    pub mirror_port: u16,
}


/// The store's gauges and the cluster's membership, rendered on `/metrics`.
struct NodeGauges<'a>(&'a Mirror);

impl MetricsSource for NodeGauges<'_> {
    fn render(&self, r: &mut prometheus_client::registry::Registry) {
        use crate::metrics::{counter, gauge};
        let s = self.0.store().stats();
        gauge(r, "store_used_bytes", "Bytes reserved by cached blobs", s.used_bytes as i64);
        gauge(r, "store_budget_bytes", "Cache budget", s.budget_bytes as i64);
        gauge(r, "store_blobs", "Blobs in the cache, complete or partial", s.blobs as i64);
        gauge(r, "store_complete_blobs", "Complete, verified blobs in the cache", s.complete_blobs as i64);
        r.register("store_evictions", "Blobs evicted to stay within the budget", prometheus_client::metrics::counter::ConstCounter::new(s.evictions));
        if let Some(cl) = self.0.cluster() {
            gauge(r, "members", "Live cluster members known to this node, itself included", cl.peers.members().len() as i64);
        }
        counter(r, "peer_addrs_ignored", "Peer addresses from gossip that cannot be dialled from here (wildcard, port 0, foreign loopback), ignored", &crate::peers::IGNORED_PEER_ADDRS);
    }
}

/// How long a digest the cluster lied about is fetched from upstream directly.
const DISTRUST: Duration = Duration::from_secs(600);

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A blob's owner fetches it from upstream in chunks of this many pieces (16 MiB) when it splits
/// the fetch: big enough that a request's round trip is small next to its transfer, small enough
/// that a 256 MiB blob gives 16 chunks to spread.
const CHUNK_PIECES: u32 = 16;
/// At most this many nodes fetch parts of one blob (the owner included): each is one more
/// upstream connection.
const MAX_PARTS: usize = 8;

/// Bound on answering a range read from peers before it is relayed from upstream instead.
const RANGE_BUDGET: Duration = Duration::from_secs(10);

/// How long a request waits for another request's upstream fetch of the same blob.
const FOLLOW_BOUND: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

/// The other agents: where a miss looks before going upstream.
#[derive(Clone)]
pub struct Cluster {
    pub transfer: Transfer,
    pub peers: Arc<dyn PeerDirectory>,
    /// Bound on getting a blob from peers before falling back (owner fetches excluded).
    pub peer_budget: Duration,
    /// Bound on waiting for the owner of a blob to fetch it from upstream.
    pub owner_budget: Duration,
}

struct Inner {
    cfg: MirrorConfig,
    cluster: Option<Cluster>,
    store: Store,
    upstream: Upstream,
    /// Media types of cached manifests (`<hex>` -> type); the store keeps bytes only.
    media_dir: PathBuf,
    /// sha256(registry, repository, credential) -> when upstream last confirmed access.
    auth: Mutex<HashMap<[u8; 32], Instant>>,
    /// Upstream fetches in progress on this node, one per digest (single flight): a second
    /// request for the same blob waits for the first instead of fetching again.
    flights: SingleFlight<Digest>,
    /// Digests the cluster gave a wrong blob for (every piece matched its manifest, the blob
    /// not its digest), until when: this node fetches those from upstream itself meanwhile, so a
    /// lying member costs each node one aborted stream per blob, not one per request.
    distrusted: Mutex<HashMap<Digest, Instant>>,
    prefetch_slots: Arc<Semaphore>,
    /// Parts of split blobs this node is fetching for a peer (`FetchPart`), one fetch per part:
    /// followers wait for the leader's outcome.
    part_flights: SingleFlight<(Digest, u8)>,
    /// Background prefetches running (at most one per digest).
    prefetches: SingleFlight<Digest>,
    /// Verified manifests (from complete holders) of blobs read by range, not yet here whole.
    range_manifests: Mutex<HashMap<Digest, Arc<transfer::wire::WireManifest>>>,
    upstream_limit: Option<Arc<RateLimit>>,
    counters: Counters,
    metrics_sources: Mutex<Vec<Arc<dyn MetricsSource>>>,
    node: std::sync::OnceLock<NodeInfo>,
}

type Resp = Response<Body>;

/// Where a streamed blob is coming from (for the counters).
#[derive(Clone, Copy)]
enum Via {
    Cluster,
    Upstream,
}

impl Mirror {
    pub fn new(cfg: MirrorConfig, store: Store, state_dir: PathBuf, cluster: Option<Cluster>) -> Result<Self, MirrorError> {
        let media_dir = state_dir.join("media-types");
        std::fs::create_dir_all(&media_dir).map_err(|e| MirrorError::Io(media_dir.display().to_string(), e))?;
        let origins = upstream::Origins::new(&cfg.registries, &cfg.blob_hosts);
        let upstream = Upstream::new(cfg.connect_timeout, cfg.head_timeout, cfg.read_timeout, origins)?;
        let slots = Arc::new(Semaphore::new(cfg.max_prefetches));
        let upstream_limit = cfg.upstream_limit.map(RateLimit::new);
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                cluster,
                store,
                upstream,
                media_dir,
                auth: Mutex::new(HashMap::new()),
                flights: SingleFlight::default(),
                distrusted: Mutex::new(HashMap::new()),
                prefetch_slots: slots,
                part_flights: SingleFlight::default(),
                prefetches: SingleFlight::default(),
                range_manifests: Mutex::new(HashMap::new()),
                upstream_limit,
                counters: Counters::default(),
                metrics_sources: Mutex::new(Vec::new()),
                node: std::sync::OnceLock::new(),
            }),
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Records how this node was set up; returns the self-check's warnings (also in status).
    pub fn set_node_info(&self, info: NodeInfo) -> Vec<String> {
        let _ = self.inner.node.set(info);
        self.self_check().1
    }

    /// What each registry gets from this node, and warnings about a setup that cannot be
    /// useful: (per registry: name, url, "cached" or "relayed", why), warnings.
    fn self_check(&self) -> (Vec<admin::RegistryCheck>, Vec<String>) {
        let node = self.inner.node.get().cloned().unwrap_or_default();
        let mut regs: Vec<_> = self
            .inner
            .cfg
            .registries
            .iter()
            .map(|r| {
                let https = r.url.scheme() == "https";
                let hosts_toml = node.hosts_toml_dir.as_ref().map(|dir| dir.join(&r.name).join("hosts.toml"));
                let via_hosts_toml = hosts_toml.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).is_some_and(|t| {
                    t.contains(&format!("127.0.0.1:{}", node.mirror_port)) || t.contains(&format!("localhost:{}", node.mirror_port))
                });
                if via_hosts_toml {
                    let f = hosts_toml.map(|f| f.display().to_string()).unwrap_or_default();
                    return admin::RegistryCheck { name: r.name.clone(), url: r.url.to_string(), pulls: "cached".into(), why: format!("containerd's {f} names this mirror (the registry is its fallback)") };
                }
                let (state, why) = match (node.mode.as_str(), https, node.tls_intercept) {
                    ("transparent", false, _) => ("cached", "plain HTTP: redirected connections are served by the mirror".to_string()),
                    ("transparent", true, true) => ("cached", "HTTPS terminated with the intercept CA: cached when the node trusts it, else the pull fails TLS".to_string()),
                    ("transparent", true, false) => ("relayed", "HTTPS without --tls-intercept: redirected connections are relayed untouched, not cached (use hosts.toml for this registry, or --tls-intercept)".to_string()),
                    _ => ("cached", "for clients pointed at this mirror (containerd hosts.toml with ns=, or the Host header)".to_string()),
                };
                admin::RegistryCheck { name: r.name.clone(), url: r.url.to_string(), pulls: state.to_string(), why }
            })
            .collect();
        regs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut warn = Vec::new();
        if let Some(a) = node.advertised {
            if a.ip().is_unspecified() {
                warn.push(format!("advertising the wildcard address {a}: peers cannot reach this node (set --advertise-addr)"));
            }
            let remote_seeds = !node.seeds.is_empty() || node.static_peers > 0;
            if a.ip().is_loopback() && remote_seeds && node.advertised_how == crate::identity::Chosen::Loopback.to_string() {
                warn.push(format!("advertising loopback {a} ({}): nodes on other hosts cannot reach it (set --advertise-addr)", node.advertised_how));
            }
            if !node.seeds.is_empty() && node.seeds_resolved == 0 {
                warn.push(format!("no seed resolved at start ({}): gossip keeps trying", node.seeds.join(", ")));
            }
        }
        if regs.iter().all(|r| r.pulls == "relayed") && !regs.is_empty() {
            warn.push("no registry is cached: every pull is relayed to the registry (see registries in `peerd status`)".into());
        }
        (regs, warn)
    }

    /// `/metrics`: the mirror's counters, this node's gauges and every added source.
    fn metrics_text(&self) -> String {
        let added = self.metrics_sources();
        let node = NodeGauges(self);
        let mut all: Vec<&dyn MetricsSource> = vec![self.counters(), &node];
        all.extend(added.iter().map(|s| s.as_ref() as &dyn MetricsSource));
        crate::metrics::render(&all)
    }

    /// Adds metrics rendered with the mirror's own on `/metrics`.
    pub fn add_metrics_source(&self, src: Arc<dyn MetricsSource>) {
        self.inner.metrics_sources.lock().unwrap_or_else(|e| e.into_inner()).push(src);
    }

    pub fn metrics_sources(&self) -> Vec<Arc<dyn MetricsSource>> {
        self.inner.metrics_sources.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }

    /// The admin API (openapi.yaml): cache listing and removal. Changes are accepted only from
    /// this node (loopback), since the mirror port may be reachable from the network.
    async fn admin(&self, req: &Request<()>, path: &str, peer: SocketAddr) -> Option<Resp> {
        if path == "/preheat" {
            if *req.method() != Method::POST {
                return Some(error(405, "UNSUPPORTED", "POST /preheat?image=registry/name:tag"));
            }
            if !peer.ip().is_loopback() {
                return Some(error(403, "DENIED", "preheat is accepted from this node only"));
            }
            let image = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("image="))).map(percent_decode);
            return Some(match image {
                Some(i) => self.preheat(&i),
                None => error(400, "IMAGE_INVALID", "missing ?image=registry/name:tag"),
            });
        }
        let rest = path.strip_prefix("/cache")?;
        let m = req.method();
        // The listing names every cached digest: what an attacker needs to ask for someone
        // else's blob. This node only, like every admin call.
        if !peer.ip().is_loopback() {
            return Some(error(403, "DENIED", "the admin API answers this node (loopback) only"));
        }
        if rest.is_empty() || rest == "/" {
            if *m != Method::GET {
                return Some(error(405, "UNSUPPORTED", "GET /cache lists the cache"));
            }
            let items: Vec<admin::CacheEntry> = self
                .inner
                .store
                .list()
                .into_iter()
                .map(|b| admin::CacheEntry { digest: b.digest.to_string(), size: b.size, complete: b.complete, pieces_present: b.pieces_present, pieces_total: b.pieces_total })
                .collect();
            return Some(json_response(200, &items));
        }
        let digest = rest.strip_prefix('/')?;
        if *m != Method::DELETE {
            return Some(error(405, "UNSUPPORTED", "DELETE /cache/<digest> removes a blob"));
        }
        if !peer.ip().is_loopback() {
            return Some(error(403, "DENIED", "cache changes are accepted from this node only"));
        }
        let d: Digest = match digest.parse() {
            Ok(d) => d,
            Err(e) => return Some(error(400, "DIGEST_INVALID", &e.to_string())),
        };
        Some(match self.inner.store.remove(&d).await {
            Ok(true) => {
                let _ = std::fs::remove_file(self.inner.media_dir.join(d.hex()));
                let mut r = Response::new(Body::Empty);
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Ok(false) | Err(crate::store::StoreError::NotFound(_)) => error(404, "BLOB_UNKNOWN", &format!("{d} is not cached")),
            Err(crate::store::StoreError::Pinned(_)) => error(409, "BUSY", &format!("{d} is being read or written; try again")),
            Err(e) => error(500, "INTERNAL", &e.to_string()),
        })
    }

    /// Fetches every blob of an image into the cluster (through the normal miss path: peers, the
    /// rendezvous owner, upstream), streaming one JSON line of progress per blob and a last line
    /// `{"done":true,...}` or `{"error":...}`.
    fn preheat(&self, image: &str) -> Resp {
        let Some((registry, name, reference)) = parse_image(image) else {
            return error(400, "IMAGE_INVALID", "image must be registry/name:tag or registry/name@digest");
        };
        let Some(reg) = self.inner.cfg.registries.resolve(Some(&registry), None).cloned() else {
            return error(404, "NAME_UNKNOWN", &format!("unknown registry {registry}; configure it with --registry NAME=URL"));
        };
        if !oci::valid_name(&name) {
            return error(400, "NAME_INVALID", &format!("invalid repository name {name:?}"));
        }
        let (tx, body) = Body::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let line = |l: admin::PreheatLine| Ok(Bytes::from(serde_json::to_string(&l).unwrap_or_default() + "\n"));
            let result: Result<(usize, u64), String> = async {
                let mut accept = HeaderMap::new();
                accept.insert(header::ACCEPT, header::HeaderValue::from_static(MANIFEST_TYPES));
                let mut refs = vec![reference];
                let mut blobs: Vec<(Digest, u64)> = Vec::new();
                while let Some(r) = refs.pop() {
                    let parsed = oci::parse_reference(&r).map_err(|e| e.message)?;
                    let resp = this.manifest(false, &reg, &name, parsed, &accept).await;
                    let status = resp.status();
                    let bytes = collect(resp.into_body()).await.map_err(|e| e.to_string())?;
                    if status != StatusCode::OK {
                        return Err(format!("manifest {r}: {status}: {}", String::from_utf8_lossy(&bytes)));
                    }
                    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("manifest {r}: {e}"))?;
                    for m in v["manifests"].as_array().into_iter().flatten() {
                        if let Some(d) = m["digest"].as_str() {
                            refs.push(d.to_string());
                        }
                    }
                    for b in std::iter::once(&v["config"]).chain(v["layers"].as_array().into_iter().flatten()) {
                        if let (Some(Ok(d)), Some(size)) = (b["digest"].as_str().map(str::parse::<Digest>), b["size"].as_u64()) {
                            if !blobs.iter().any(|(x, _)| *x == d) {
                                blobs.push((d, size));
                            }
                        }
                    }
                }
                let total: u64 = blobs.iter().map(|b| b.1).sum();
                let mut done = 0u64;
                for (i, (d, size)) in blobs.iter().enumerate() {
                    let resp = this.blob(false, &reg, &name, *d, &HeaderMap::new()).await;
                    let status = resp.status();
                    let bytes = collect(resp.into_body()).await.map_err(|e| format!("blob {d}: {e}"))?;
                    if status != StatusCode::OK {
                        return Err(format!("blob {d}: {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)])));
                    }
                    done += size;
                    let _ = tx.send(line(admin::PreheatLine::Blob { blob: d.to_string(), index: i + 1, blobs: blobs.len(), done_bytes: done, total_bytes: total })).await;
                }
                Ok((blobs.len(), total))
            }
            .await;
            let last = match result {
                Ok((n, total)) => admin::PreheatLine::Done { done: true, blobs: n, total_bytes: total },
                Err(e) => admin::PreheatLine::Error { error: e },
            };
            let _ = tx.send(line(last)).await;
        });
        let mut r = Response::new(body);
        set(r.headers_mut(), header::CONTENT_TYPE, "application/x-ndjson");
        r
    }

    /// What `peerd status` prints: this node, its cache, its peers, the self-check.
    fn status(&self) -> admin::Status {
        let s = self.inner.store.stats();
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (mut me, mut peers) = (String::new(), Vec::new());
        if let Some(cl) = &self.inner.cluster {
            me = cl.peers.me().to_string();
            peers = cl
                .peers
                .describe()
                .into_iter()
                .map(|p| admin::Peer { id: p.id, addr: p.addr, zone: p.zone, state: p.state, last_seen_ms: p.last_seen_ms, advertised: p.advertised.map(|(complete, partial)| admin::Advertised { complete, partial }) })
                .collect();
        }
        let in_progress = self
            .inner
            .store
            .list()
            .into_iter()
            .filter(|b| !b.complete)
            .map(|b| admin::InProgress { digest: b.digest.to_string(), size: b.size, pieces_present: b.pieces_present, pieces_total: b.pieces_total })
            .collect();
        let (from_peers, to_peers) = self.inner.cluster.as_ref().map_or((0, 0), |cl| {
            let t = cl.transfer.counters();
            (load(&t.bytes_from_peers), load(&t.bytes_to_peers))
        });
        let node = self.inner.node.get().cloned().unwrap_or_default();
        let (registries, warnings) = self.self_check();
        let my_id = node.node_id.clone();
        let mut warnings = warnings;
        if !my_id.is_empty() && peers.iter().any(|p: &admin::Peer| p.id == my_id) {
            warnings.push(format!("another member uses this node's id {my_id:?} (a copied data dir?): delete <data-dir>/node-id on one of them"));
        }
        let peers_alive = peers.iter().filter(|p| p.state == "alive" || p.state == "configured").count();
        admin::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            self_check: admin::SelfCheck {
                node_id: node.node_id,
                hostname: node.hostname,
                mode: node.mode,
                advertised: node.advertised.map(|a| a.to_string()).unwrap_or_default(),
                advertised_from: node.advertised_how,
                seeds: node.seeds,
                seeds_resolved: node.seeds_resolved,
                peers_alive,
                registries,
                warnings,
            },
            peer_addr: me,
            cache: admin::CacheStats { used_bytes: s.used_bytes, budget_bytes: s.budget_bytes, blobs: s.blobs, complete_blobs: s.complete_blobs, evictions: s.evictions },
            requests: admin::Requests { hits: load(&c.hits), peer_hits: load(&c.hits_from_peers), misses: load(&c.misses) },
            bytes: admin::ByteCounts { from_upstream: load(&c.bytes_from_upstream), from_peers, to_peers, to_clients_from_cache: load(&c.bytes_from_cache) },
            in_progress,
            peers,
        }
    }

    /// Serves HTTP/1.1 on `listener` until the task is dropped, at most `max_connections`
    /// connections at once.
    pub async fn serve(self, listener: TcpListener, max_connections: usize) -> std::io::Result<()> {
        httpd::serve(self, listener, max_connections).await
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<()>, peer: SocketAddr) -> Resp {
        use tracing::Instrument;
        let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), %peer);
        self.route(req, peer).instrument(span).await
    }

    /// Serves a connection the kernel redirected to the agent, meant for `registry`, for as long
    /// as its requests are pulls; returns the rest of the connection when one is not.
    pub async fn serve_redirected(&self, stream: Stream, peer: SocketAddr, registry: Registry) -> std::io::Result<Option<Handback>> {
        httpd::connection(self.clone(), stream, peer, Some(registry)).await
    }

    /// A pull on a redirected connection. The Host header names the registry when it is one we
    /// know (several registry names may share an address); otherwise the one whose address the
    /// client dialled.
    async fn handle_redirected(&self, req: Request<()>, peer: SocketAddr, dialled: &Registry) -> Resp {
        use tracing::Instrument;
        let span = tracing::info_span!("redirected", method = %req.method(), path = %req.uri().path(), %peer);
        async {
            let head = req.method() == Method::HEAD;
            let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
            let reg = self.inner.cfg.registries.resolve(None, host).unwrap_or(dialled).clone();
            match oci::parse(req.uri().path()) {
                Some(Ok(Route::Blob { name, digest })) => self.blob(head, &reg, &name, digest, req.headers()).await,
                Some(Ok(Route::Manifest { name, reference })) => self.manifest(head, &reg, &name, reference, req.headers()).await,
                _ => error(404, "NOT_FOUND", "not a pull request"),
            }
        }
        .instrument(span)
        .await
    }

    async fn route(&self, req: Request<()>, peer: SocketAddr) -> Resp {
        let path = req.uri().path().to_string();
        if let Some(r) = self.admin(&req, &path, peer).await {
            return r;
        }
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return error(405, "UNSUPPORTED", "only GET and HEAD are supported"),
        };
        if path == "/healthz" {
            return simple(200, "ok");
        }
        // Liveness is /healthz; this says whether the node is useful as set up (the self-check
        // has no warnings), for people and probes that want to know.
        if path == "/readyz" {
            let warnings = self.status().self_check.warnings;
            let ready = warnings.is_empty();
            return json_response(if ready { 200 } else { 503 }, &admin::Ready { ready, warnings });
        }
        if path == "/metrics" {
            let mut r = Response::new(Body::full(self.metrics_text()));
            set(r.headers_mut(), header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
            return r;
        }
        if path == "/status" {
            if !peer.ip().is_loopback() {
                return error(403, "DENIED", "the admin API answers this node (loopback) only");
            }
            return json_response(200, &self.status());
        }
        if path.starts_with("/blobs/") {
            return self.proxy(head, &req).await;
        }
        let route = match oci::parse(&path) {
            None => return error(404, "NOT_FOUND", &format!("no such endpoint {path}")),
            Some(Err(r)) => return rejection(r),
            Some(Ok(r)) => r,
        };
        if route == Route::Base {
            let mut r = simple(200, "{}");
            r.headers_mut().insert("docker-distribution-api-version", header::HeaderValue::from_static("registry/2.0"));
            return r;
        }
        let ns = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ns=")))
            .map(percent_decode);
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
        let Some(reg) = self.inner.cfg.registries.resolve(ns.as_deref(), host) else {
            let which = ns.as_deref().or(host).unwrap_or("(none)");
            return error(
                404,
                "NAME_UNKNOWN",
                &format!("unknown upstream registry {which}; configure it with --registry NAME=URL"),
            );
        };
        let reg = reg.clone();
        match route {
            Route::Blob { name, digest } => self.blob(head, &reg, &name, digest, req.headers()).await,
            Route::Manifest { name, reference } => self.manifest(head, &reg, &name, reference, req.headers()).await,
            Route::Relay { name, kind, reference } => {
                inc(&self.inner.counters.relayed_uncacheable);
                let fwd = forward(req.headers(), &[header::AUTHORIZATION, header::ACCEPT, header::RANGE]);
                self.relay(if head { Method::HEAD } else { Method::GET }, reg.api_url(&name, kind, &reference), &fwd).await
            }
            Route::Base => unreachable!("handled above"),
        }
    }

    async fn blob(&self, head: bool, reg: &Registry, name: &str, d: Digest, h: &HeaderMap) -> Resp {
        let url = reg.api_url(name, "blobs", &d.to_string());
        if let Some(size) = self.stored_size(&d) {
            if let Err(r) = self.authorize(&reg.name, name, &d, url.clone(), h, true).await {
                return r;
            }
            inc(&self.inner.counters.hits);
            return self.serve_stored(&d, size, range_header(h), if_range_header(h), head, "application/octet-stream");
        }
        inc(&self.inner.counters.misses);
        let fwd = forward(h, &[header::AUTHORIZATION]);
        if head {
            return self.relay(Method::HEAD, url, &fwd).await;
        }
        if self.inner.cluster.is_some() {
            // Content from peers is still this client's only if the registry says so.
            if let Err(r) = self.authorize(&reg.name, name, &d, url.clone(), h, true).await {
                return r;
            }
            if let Some(range) = range_header(h) {
                // A byte range of a blob not here: the pieces covering it, from peers that hold
                // the blob verified; the rest of the blob in the background, peers first.
                if let Some(resp) = self.range_from_cluster(&d, range).await {
                    self.prefetch(d, url.clone(), fwd, Source::Upstream(reg.name.clone()));
                    return resp;
                }
            }
            let started = Instant::now();
            if range_header(h).is_some() {
                // No peer holds it verified: upstream's range now, the blob in the background.
                return self.relay_range(d, url, fwd, h, Source::Upstream(reg.name.clone())).await;
            }
            let job = {
                let (this, url, fwd) = (self.clone(), url.clone(), fwd.clone());
                tokio::spawn(async move { this.get_from_cluster(&d, &url, &fwd).await })
            };
            // A whole-blob GET starts streaming as soon as verified pieces from peers are
            // readable (`stream_arriving`); a range waits for the whole blob.
            let mut job = Some(job);
            if range_header(h).is_none() {
                let mut content = self.inner.store.watch_content();
                while let Some(j) = job.as_mut() {
                    if let Some((size, pieces)) = self.streamable(&d) {
                        let Some(j) = job.take() else { break };
                        // If the cluster fails mid-stream, the rest comes from upstream.
                        let this = self.clone();
                        let auth = authorization(&fwd).map(str::to_owned);
                        let fallback = async move { this.finish_from_upstream(d, url.to_string(), auth).await };
                        return self.stream_arriving(d, (size, pieces), j, fallback, started, Via::Cluster);
                    }
                    tokio::select! {
                        r = j => {
                            job = None;
                            if r.unwrap_or(false) {
                                return self.served_from_cluster(&d, None, None, started);
                            }
                        }
                        changed = content.changed() => if changed.is_err() { break },
                    }
                }
            }
            if let Some(j) = job {
                if j.await.unwrap_or(false) {
                    return self.served_from_cluster(&d, range_header(h), if_range_header(h), started);
                }
            }
        }
        if range_header(h).is_some() {
            return self.relay_range(d, url, fwd, h, Source::Upstream(reg.name.clone())).await;
        }
        self.pull_through(d, url, &fwd, Source::Upstream(reg.name.clone())).await
    }

    /// A part of a blob nobody here holds verified: relayed from the origin as is (a relay: the
    /// client checks what it asked for), while the whole blob is fetched in the background
    /// (peers and the owner first) so the next read is a verified hit.
    async fn relay_range(&self, d: Digest, url: reqwest::Url, fwd: HeaderMap, h: &HeaderMap, source: Source) -> Resp {
        let mut with_range = fwd.clone();
        if let Some(v) = range_header(h).and_then(|r| header::HeaderValue::from_str(r).ok()) {
            with_range.insert(header::RANGE, v);
        }
        self.prefetch(d, url.clone(), fwd, source);
        self.relay(Method::GET, url, &with_range).await
    }

    /// Answers `range` of `d` from the pieces covering it: those already here, the rest from
    /// peers holding the blob complete, each piece checked against that holder's verified
    /// manifest (`VerifiedManifest`: hashes of a blob whose sha256 it checked). Nothing outside
    /// the range is waited for. `None` when no peer can (the caller relays from upstream).
    async fn range_from_cluster(&self, d: &Digest, range: &str) -> Option<Resp> {
        let c = self.inner.cluster.as_ref()?;
        if self.distrusted(d) {
            return None;
        }
        // Complete holders first (gossip says which); static peers are all asked.
        let holders: Vec<SocketAddr> = c.peers.holders(d).into_iter().map(|h| h.0).collect();
        if holders.is_empty() {
            return None;
        }
        let cached = self.inner.range_manifests.lock().unwrap_or_else(|e| e.into_inner()).get(d).cloned();
        let m = match cached {
            Some(m) => m,
            None => {
                let (first, m) = tokio::time::timeout(RANGE_BUDGET, c.transfer.verified_manifest(d, &holders)).await.ok()??;
                // A second complete holder, when one answers quickly, must agree: one member
                // with wrong hashes cannot then decide alone what a range read returns.
                let others: Vec<SocketAddr> = holders.iter().copied().filter(|h| *h != first).collect();
                if !others.is_empty() {
                    if let Ok(Some((second, m2))) = tokio::time::timeout(Duration::from_millis(300), c.transfer.verified_manifest(d, &others)).await {
                        if m2 != m {
                            self.distrust(d, &transfer::TransferError::Lied { peer: second, msg: format!("its verified manifest differs from {first}'s") });
                            return None;
                        }
                    }
                }
                let m = Arc::new(m);
                let mut all = self.inner.range_manifests.lock().unwrap_or_else(|e| e.into_inner());
                if all.len() >= 1024 {
                    all.clear();
                }
                all.insert(*d, m.clone());
                m
            }
        };
        let (start, end) = match range::answer(&Method::GET, Some(range.as_bytes()), None, &format!("\"{d}\""), m.size) {
            RangeAnswer::Partial { start, end } => (start, end),
            // A whole-body or unsatisfiable answer is the normal path's to give.
            _ => return None,
        };
        let ps = u64::from(m.piece_size);
        let pieces = (start / ps) as u32..(end / ps) as u32 + 1;
        let fetched = tokio::time::timeout(RANGE_BUDGET, c.transfer.fetch_pieces(d, &m, &holders, pieces.clone())).await;
        if !matches!(fetched, Ok(Ok(()))) {
            inc(&self.inner.counters.range_peer_fallbacks);
            debug!(%d, "range from peers failed, relaying from upstream: {fetched:?}");
            return None;
        }
        // A covering piece another download (the background prefetch) had claimed lands when
        // that download stores it: wait for it rather than relay from upstream.
        let landed = tokio::time::timeout(RANGE_BUDGET, async {
            for i in pieces.clone() {
                self.inner.store.wait_piece(d, i as usize).await?;
            }
            Ok::<(), crate::store::StoreError>(())
        })
        .await;
        if !matches!(landed, Ok(Ok(()))) {
            inc(&self.inner.counters.range_peer_fallbacks);
            return None;
        }
        // Every covering piece must carry the verified manifest's hash (a piece stored earlier
        // by a download whose manifest came from elsewhere is not trusted for this).
        let (_, _, hashes) = self.inner.store.known_hashes(d)?;
        if pieces.clone().any(|i| hashes.get(i as usize).copied().flatten().map(|h| *h.as_bytes()) != Some(m.pieces[i as usize])) {
            inc(&self.inner.counters.range_peer_fallbacks);
            return None;
        }
        let bytes = tokio::time::timeout(RANGE_BUDGET, self.inner.store.read_range(d, start, end - start + 1)).await.ok()?.ok()?;
        inc(&self.inner.counters.ranges_from_peers);
        self.inner.counters.bytes_from_cache.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut r = Response::new(Body::full(bytes));
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        let hs = r.headers_mut();
        set(hs, header::CONTENT_LENGTH, &(end - start + 1).to_string());
        set(hs, header::CONTENT_TYPE, "application/octet-stream");
        set(hs, header::ACCEPT_RANGES, "bytes");
        set(hs, header::CONTENT_RANGE, &format!("bytes {start}-{end}/{}", m.size));
        set(hs, "docker-content-digest", &d.to_string());
        set(hs, header::ETAG, &format!("\"{d}\""));
        Some(r)
    }

    async fn manifest(&self, head: bool, reg: &Registry, name: &str, reference: Reference, h: &HeaderMap) -> Resp {
        let url = reg.api_url(name, "manifests", &reference.to_string());
        if let Reference::Digest(d) = &reference {
            if let (Some(size), Some(mt)) = (self.stored_size(d), self.media_type(d)) {
                if let Err(r) = self.authorize(&reg.name, name, d, url.clone(), h, true).await {
                    return r;
                }
                inc(&self.inner.counters.hits);
                return self.serve_stored(d, size, None, None, head, &mt);
            }
        }
        // Tags move, so they always revalidate upstream; digests we lack are fetched.
        inc(&self.inner.counters.misses);
        let fwd = forward(h, &[header::AUTHORIZATION, header::ACCEPT]);
        if head {
            return self.relay(Method::HEAD, url, &fwd).await;
        }
        let resp = match self.inner.upstream.send(Method::GET, url, &fwd).await {
            Ok(r) => r,
            Err(e) => return self.upstream_failed(e),
        };
        if resp.status() != reqwest::StatusCode::OK {
            return passthrough(resp, Some(MAX_ERROR_BODY), None).await;
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_string();
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let body = match read_limited(resp, MAX_MANIFEST).await {
            Ok(b) => b,
            Err(msg) => return error(502, "MANIFEST_INVALID", &msg),
        };
        let computed = Digest::from_sha256_bytes(sha2::Sha256::digest(&body).into());
        let expected = match &reference {
            Reference::Digest(d) => Some(*d),
            Reference::Tag(_) => claimed,
        };
        if let Some(want) = expected.filter(|w| *w != computed) {
            inc(&self.inner.counters.digest_mismatch);
            warn!(registry = %reg.name, %name, %want, %computed, "upstream manifest does not match its digest");
            return error(502, "DIGEST_INVALID", &format!("upstream sent a manifest with digest {computed}, expected {want}"));
        }
        self.cache_manifest(computed, &body, &media_type, &reg.name).await;
        let mut r = Response::new(Body::full(body.clone()));
        let hs = r.headers_mut();
        set(hs, header::CONTENT_TYPE, &media_type);
        set(hs, header::CONTENT_LENGTH, &body.len().to_string());
        set(hs, "docker-content-digest", &computed.to_string());
        r
    }

    async fn cache_manifest(&self, d: Digest, body: &Bytes, media_type: &str, registry: &str) {
        if self.stored_size(&d).is_none() {
            let res = async {
                let mut w = self.inner.store.writer(&d, body.len() as u64, Source::Upstream(registry.into())).await?;
                w.write(body).await?;
                w.finish().await
            }
            .await;
            if let Err(e) = res {
                inc(&self.inner.counters.cache_skipped);
                debug!(%d, "manifest not cached: {e}");
                return;
            }
        }
        // Written after the bytes: a manifest without its type is treated as not cached.
        let path = self.inner.media_dir.join(d.hex());
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, media_type).and_then(|_| std::fs::rename(&tmp, &path)).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    fn media_type(&self, d: &Digest) -> Option<String> {
        std::fs::read_to_string(self.inner.media_dir.join(d.hex())).ok()
    }

    fn stored_size(&self, d: &Digest) -> Option<u64> {
        self.inner.store.complete_size(d)
    }

    /// Multi-tenant safety: cached content of a repository is served only after upstream has
    /// confirmed, recently, that this client's credential may read it there. The answer is a HEAD
    /// with the client's Authorization; a 401/403 goes back to the client with the registry's
    /// challenge, so it authenticates as it would against the registry itself.
    ///
    /// The decision is for exactly what is served: (credential, registry, repository, digest),
    /// so a permission for one blob never unlocks another cached under the same repository.
    /// `redirects` says whether a temporary redirect (302/303/307: a registry sending the read
    /// to its storage) counts as yes; a permanent one (301/308: the registry canonicalising a
    /// path) never does, nor does anything but a 2xx from blob storage itself.
    async fn authorize(
        &self,
        registry: &str,
        repo: &str,
        what: &Digest,
        url: reqwest::Url,
        client: &HeaderMap,
        redirects: bool,
    ) -> Result<(), Resp> {
        let auth = client.get(header::AUTHORIZATION);
        if self.inner.cfg.trust_cluster {
            return Ok(());
        }
        let mut k = sha2::Sha256::new();
        for part in [registry.as_bytes(), repo.as_bytes(), what.as_bytes(), auth.map_or(&b""[..], |a| a.as_bytes())] {
            k.update((part.len() as u64).to_le_bytes());
            k.update(part);
        }
        let key: [u8; 32] = k.finalize().into();
        let ttl = self.inner.cfg.auth_ttl;
        if self.inner.auth.lock().unwrap_or_else(|e| e.into_inner()).get(&key).is_some_and(|t| t.elapsed() < ttl) {
            return Ok(());
        }
        inc(&self.inner.counters.auth_checks);
        // The client's Accept too: registries answer 404 for a manifest whose media type the
        // request does not accept.
        let mut h = forward(client, &[header::AUTHORIZATION, header::ACCEPT]);
        if !h.contains_key(header::ACCEPT) {
            h.insert(header::ACCEPT, header::HeaderValue::from_static(MANIFEST_TYPES));
        }
        let resp = match self.inner.upstream.check(url, &h).await {
            Ok(r) => r,
            Err(e) => {
                inc(&self.inner.counters.auth_denied);
                warn!("cannot confirm access upstream, not serving cached content: {e}");
                return Err(error(502, "UNAVAILABLE", &format!("cannot confirm access with the registry: {e}")));
            }
        };
        let status = resp.status();
        let temporary_redirect = matches!(status.as_u16(), 302 | 303 | 307);
        if status.is_success() || (redirects && temporary_redirect) {
            let mut m = self.inner.auth.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, t| t.elapsed() < ttl);
            m.insert(key, Instant::now());
            return Ok(());
        }
        inc(&self.inner.counters.auth_denied);
        Err(passthrough(resp, Some(MAX_ERROR_BODY), None).await)
    }

    /// Serves a verified blob from the store, honouring Range (and If-Range).
    fn serve_stored(&self, d: &Digest, size: u64, range: Option<&str>, if_range: Option<&[u8]>, head: bool, content_type: &str) -> Resp {
        let Some(pin) = self.inner.store.pin(d) else {
            return error(404, "BLOB_UNKNOWN", &format!("{d} was evicted"));
        };
        let method = if head { Method::HEAD } else { Method::GET };
        let etag = format!("\"{d}\"");
        let (status, start, len) = match range::answer(&method, range.map(str::as_bytes), if_range, &etag, size) {
            RangeAnswer::Full => (200, 0, size),
            RangeAnswer::Partial { start, end } => (206, start, end - start + 1),
            RangeAnswer::Unsatisfiable => {
                let mut r = error(416, "RANGE_INVALID", &format!("range {} not satisfiable for {size} bytes", range.unwrap_or("")));
                set(r.headers_mut(), header::CONTENT_RANGE, &format!("bytes */{size}"));
                return r;
            }
        };
        let body = if head || len == 0 {
            Body::Empty
        } else {
            // The store keeps a complete blob at [0, size) of its data file; the pin keeps it
            // there (eviction would unlink it, and an open fd stays valid even then).
            let file = self.inner.store.blob_file_path(d).and_then(|p| std::fs::File::open(p).ok());
            let Some(file) = file else {
                return error(404, "BLOB_UNKNOWN", &format!("{d} was evicted"));
            };
            self.inner.counters.bytes_from_cache.fetch_add(len, Ordering::Relaxed);
            Body::File { file, offset: start, len, hold: Box::new(pin) }
        };
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        let hs = r.headers_mut();
        set(hs, header::CONTENT_LENGTH, &len.to_string());
        set(hs, header::CONTENT_TYPE, content_type);
        set(hs, header::ACCEPT_RANGES, "bytes");
        set(hs, "docker-content-digest", &d.to_string());
        set(hs, header::ETAG, &etag);
        if status == 206 {
            set(hs, header::CONTENT_RANGE, &format!("bytes {start}-{}/{size}", start + len - 1));
        }
        r
    }

    /// A miss: the blob is fetched from upstream into the store by a task of its own, and the
    /// client (and every other client asking meanwhile) is streamed the pieces from the store as
    /// they land (`stream_arriving`). The fetch runs at upstream's pace whatever the clients do:
    /// a client that stops reading holds up only itself (until the server's write timeout cuts
    /// it), never the fetch, the cache fill or the other clients. As before, the last piece goes
    /// out only after the whole blob's sha256 matched, so a wrong body reaches a client as an
    /// aborted transfer, never a complete one. A blob that cannot be stored (no length, no
    /// room) is relayed to this one client as it comes, uncached.
    async fn pull_through(&self, d: Digest, url: reqwest::Url, fwd: &HeaderMap, source: Source) -> Resp {
        let started = Instant::now();
        let auth = authorization(fwd).map(str::to_owned);
        // A body that broke off is completed by range; one that failed its digest is not
        // fetched again for this request (upstream would only send the same wrong bytes).
        let lied = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fallback = {
            let (this, url, auth, lied) = (self.clone(), url.to_string(), auth.clone(), lied.clone());
            async move {
                if lied.load(Ordering::Relaxed) {
                    return Err(FetchError::Protocol("sent a body that did not match its digest".into()));
                }
                this.finish_from_upstream(d, url, auth).await
            }
        };
        let flight = match self.flight(d) {
            Join::Lead(g) => g,
            Join::Follow(rx) => {
                // Another request is fetching it: read along with that fetch.
                let this = self.clone();
                let mut job = tokio::spawn(async move { this.follow(&d, rx, FOLLOW_BOUND).await });
                let mut content = self.inner.store.watch_content();
                loop {
                    if let Some((size, pieces)) = self.streamable(&d) {
                        return self.stream_arriving(d, (size, pieces), job, fallback, started, Via::Upstream);
                    }
                    tokio::select! {
                        r = &mut job => {
                            if r.unwrap_or(false) {
                                let size = self.stored_size(&d).unwrap_or(0);
                                return self.serve_stored(&d, size, None, None, false, "application/octet-stream");
                            }
                            // The other fetch failed: relay for this client without caching.
                            return self.relay(Method::GET, url, fwd).await;
                        }
                        changed = content.changed() => if changed.is_err() {
                            return self.relay(Method::GET, url, fwd).await;
                        },
                    }
                }
            }
        };
        let resp = match self.inner.upstream.send(Method::GET, url, fwd).await {
            Ok(r) => r,
            Err(e) => return self.upstream_failed(e),
        };
        if resp.status() != reqwest::StatusCode::OK {
            return passthrough(resp, Some(MAX_ERROR_BODY), None).await;
        }
        let writer = match resp.content_length() {
            Some(s) => match feed::PieceFeed::new(&self.inner.store, &d, s, source.clone()).await {
                Ok(w) => Ok((s, w)),
                Err(e) => Err(e.to_string()),
            },
            None => Err("upstream sent no Content-Length".to_string()),
        };
        let (size, writer) = match writer {
            Ok(w) => w,
            Err(why) => {
                inc(&self.inner.counters.cache_skipped);
                debug!(%d, "not caching, relaying: {why}");
                drop(flight);
                return self.relay_verified(d, resp);
            }
        };
        let job = {
            let this = self.clone();
            tokio::spawn(async move {
                let _flight = flight;
                match this.feed_body_keeping(resp, writer).await {
                    Ok(w) => match w.finish().await {
                        Ok(()) => {
                            info!(%d, "cached from {source}");
                            true
                        }
                        Err(e) => {
                            if matches!(e, crate::store::StoreError::DigestMismatch { .. }) {
                                inc(&this.inner.counters.digest_mismatch);
                                lied.store(true, Ordering::Relaxed);
                            }
                            warn!(%d, "not cached: {e}");
                            false
                        }
                    },
                    Err(e) => {
                        inc(&this.inner.counters.upstream_errors);
                        warn!(%d, "upstream body broke off, the rest by range: {e}");
                        false
                    }
                }
            })
        };
        let pieces = size.div_ceil(u64::from(self.inner.store.piece_size())) as usize;
        self.stream_arriving(d, (size, pieces), job, fallback, started, Via::Upstream)
    }

    /// Relays an upstream blob body that cannot be cached to one client, holding the last chunk
    /// back until the whole body's sha256 matched `d`.
    fn relay_verified(&self, d: Digest, mut resp: reqwest::Response) -> Resp {
        let size = resp.content_length();
        let (tx, body) = Body::channel(8);
        let this = self.clone();
        tokio::spawn(async move {
            let mut sha = sha2::Sha256::new();
            let mut held: Option<Bytes> = None;
            loop {
                match this.upstream_chunk(&mut resp).await {
                    Ok(Some(c)) => {
                        sha.update(&c);
                        if let Some(prev) = held.replace(c) {
                            if tx.send(Ok(prev)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        inc(&this.inner.counters.upstream_errors);
                        let _ = tx.send(Err(std::io::Error::other(format!("upstream body: {e}")))).await;
                        return;
                    }
                }
            }
            if Digest::from_sha256_bytes(sha.finalize().into()) != d {
                inc(&this.inner.counters.digest_mismatch);
                warn!(%d, "upstream body does not match its digest; aborting the response");
                let _ = tx.send(Err(std::io::Error::other("digest mismatch"))).await;
                return;
            }
            if let Some(last) = held {
                let _ = tx.send(Ok(last)).await;
            }
        });
        let mut r = Response::new(body);
        let hs = r.headers_mut();
        if let Some(s) = size {
            set(hs, header::CONTENT_LENGTH, &s.to_string());
        }
        set(hs, header::CONTENT_TYPE, "application/octet-stream");
        set(hs, "docker-content-digest", &d.to_string());
        r
    }

    fn distrusted(&self, d: &Digest) -> bool {
        let mut m = self.inner.distrusted.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        m.retain(|_, until| *until > now);
        m.contains_key(d)
    }

    fn distrust(&self, d: &Digest, why: &transfer::TransferError) {
        inc(&self.inner.counters.cluster_lied);
        warn!(%d, "the cluster gave a blob that fails its digest; fetching it from upstream for {DISTRUST:?}: {why}");
        self.inner.distrusted.lock().unwrap_or_else(|e| e.into_inner()).insert(*d, Instant::now() + DISTRUST);
    }

    /// Answers with a blob `get_from_cluster` just stored.
    fn served_from_cluster(&self, d: &Digest, range: Option<&str>, if_range: Option<&[u8]>, started: Instant) -> Resp {
        self.inner.counters.fetch_seconds.observe("cluster", started.elapsed());
        inc(&self.inner.counters.hits_from_peers);
        let size = self.stored_size(d).unwrap_or(0);
        self.serve_stored(d, size, range, if_range, false, "application/octet-stream")
    }

    /// `(size, pieces)` of a blob not yet complete whose first pieces are readable: each was
    /// checked against its blake3 before it was stored.
    fn streamable(&self, d: &Digest) -> Option<(u64, usize)> {
        if self.stored_size(d).is_some() {
            return None;
        }
        let (size, _, hashes) = self.inner.store.known_hashes(d)?;
        hashes.iter().any(Option::is_some).then_some((size, hashes.len()))
    }

    /// Streams a blob to the client while it is still arriving (from peers, or from upstream at
    /// the owner), in order, piece by piece as each lands, instead of after the last: the client
    /// reads along with the swarm rather than starting a full read-back when it ends. The last
    /// piece goes out only once the whole blob is stored, which the store allows only after its
    /// sha256 matched: as with `pull_through`'s held-back chunk, a blob that fails its digest
    /// reaches the client as an aborted transfer, never a complete one. If the cluster fails
    /// after streaming began, this node fetches the rest from upstream into the same blob.
    fn stream_arriving(
        &self,
        d: Digest,
        (size, pieces): (u64, usize),
        job: tokio::task::JoinHandle<bool>,
        fallback: impl std::future::Future<Output = Result<(), FetchError>> + Send + 'static,
        started: Instant,
        via: Via,
    ) -> Resp {
        inc(&self.inner.counters.streamed_arriving);
        let (done_tx, mut done) = tokio::sync::oneshot::channel::<bool>();
        let this = self.clone();
        tokio::spawn(async move {
            let mut ok = job.await.unwrap_or(false);
            if ok {
                match via {
                    Via::Cluster => {
                        this.inner.counters.fetch_seconds.observe("cluster", started.elapsed());
                        inc(&this.inner.counters.hits_from_peers);
                    }
                    Via::Upstream => this.inner.counters.fetch_seconds.observe("upstream", started.elapsed()),
                }
            } else {
                inc(&this.inner.counters.stream_fallbacks);
                match fallback.await {
                    Ok(()) => ok = true,
                    Err(e) => warn!(%d, "the cluster failed mid-stream and so did upstream: {e}"),
                }
            }
            let _ = done_tx.send(ok);
        });
        let (tx, body) = Body::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let store = &this.inner.store;
            let abort = |why: &str| {
                inc(&this.inner.counters.stream_aborted);
                warn!(%d, "aborting a streamed response: {why}");
                Err(std::io::Error::other(why.to_owned()))
            };
            // Every piece sent must come from this one instance of the blob, the one whose
            // sha256 is checked before the last piece goes out.
            let Some(instance) = store.instance(&d) else {
                let _ = tx.send(abort("the blob left the store")).await;
                return;
            };
            // Until the provider reports, pieces are read as they land; its report can end the
            // wait for a piece that will never come.
            let (mut waiting, mut provided) = (true, true);
            for i in 0..pieces {
                let last = i + 1 == pieces;
                let mut piece = None;
                if waiting && !last {
                    tokio::select! {
                        r = store.read_piece(&d, i) => piece = Some(r),
                        ok = &mut done => (waiting, provided) = (false, matches!(ok, Ok(true))),
                    }
                } else if waiting {
                    (waiting, provided) = (false, matches!((&mut done).await, Ok(true)));
                }
                if !provided {
                    let _ = tx.send(abort("neither the cluster nor upstream provided it")).await;
                    return;
                }
                if last && !store.has(&d) {
                    let _ = tx.send(abort("the blob did not complete with a matching sha256")).await;
                    return;
                }
                let piece = match piece {
                    Some(r) => r,
                    None => store.read_piece(&d, i).await,
                };
                if piece.is_ok() && store.instance(&d) != Some(instance) {
                    let _ = tx.send(abort("the blob was dropped (digest mismatch) and fetched again")).await;
                    return;
                }
                match piece {
                    Ok(b) => {
                        this.inner.counters.bytes_from_cache.fetch_add(b.len() as u64, Ordering::Relaxed);
                        // A client that went away does not stop the download: it fills the cache.
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(abort(&e.to_string())).await;
                        return;
                    }
                }
            }
        });
        let mut r = Response::new(body);
        let hs = r.headers_mut();
        set(hs, header::CONTENT_LENGTH, &size.to_string());
        set(hs, header::CONTENT_TYPE, "application/octet-stream");
        set(hs, header::ACCEPT_RANGES, "bytes");
        set(hs, "docker-content-digest", &d.to_string());
        set(hs, header::ETAG, &format!("\"{d}\""));
        r
    }

    /// Gets `d` into the store from the cluster: from peers holding it, else by asking the
    /// blob's rendezvous owner to fetch it from upstream once for everyone. `false` means "go
    /// upstream yourself" (this node is the owner, or the cluster could not help in time).
    async fn get_from_cluster(&self, d: &Digest, url: &reqwest::Url, fwd: &HeaderMap) -> bool {
        let Some(c) = &self.inner.cluster else { return false };
        if self.distrusted(d) {
            return false;
        }
        let ops = ClusterOps { mirror: self, c, url: url.as_str(), auth: authorization(fwd) };
        let budgets = crate::cluster::Budgets { peers: c.peer_budget, owner: c.owner_budget };
        let out = crate::cluster::get(&ops, d, budgets, |e| match e {
            crate::cluster::Event::SwarmRetry(err) => {
                inc(&self.inner.counters.swarm_retries);
                debug!(%d, "swarm stalled while the owner fetches; again: {err}");
            }
            crate::cluster::Event::OwnerFailed(owner, err) => {
                inc(&self.inner.counters.owner_failures);
                warn!(%d, %owner, "owner could not provide the blob: {err}");
            }
        })
        .await;
        match out {
            crate::cluster::Outcome::Stored => true,
            crate::cluster::Outcome::Upstream => false,
            crate::cluster::Outcome::Lied(e) => {
                self.distrust(d, &e);
                false
            }
        }
    }

    /// Fetches `d` from upstream into the store, once per node even when several peers ask at
    /// the same time (the store admits one writer; the others wait for it). Only configured
    /// upstream hosts: a peer cannot make this node fetch anything else.
    async fn fetch_to_store(&self, d: Digest, url: String, authorization: Option<String>) -> Result<(), FetchError> {
        if self.stored_size(&d).is_some() {
            return Ok(());
        }
        let (url, fwd, source) = self.for_peer(&url, authorization.as_deref())?;
        let _flight = match self.flight(d) {
            Join::Lead(g) => g,
            Join::Follow(rx) => {
                return if self.follow(&d, rx, FOLLOW_BOUND).await { Ok(()) } else { Err(FetchError::Followed("the fetch on this node failed")) };
            }
        };
        self.fetch_split(d, url, &fwd, source).await?;
        info!(%d, "fetched from upstream for the cluster");
        Ok(())
    }

    /// The last resort of a streamed response whose blob the cluster failed to finish: this node
    /// gets the pieces it still lacks from upstream itself, by byte range (the pieces it holds
    /// are kept), under the digest's single flight. Any source still reachable finishes the
    /// client's pull; only a failing upstream aborts it.
    async fn finish_from_upstream(&self, d: Digest, url: String, authorization: Option<String>) -> Result<(), FetchError> {
        if self.stored_size(&d).is_some() {
            return Ok(());
        }
        let (url, fwd, source) = self.for_peer(&url, authorization.as_deref())?;
        for _ in 0..3 {
            let _flight = match self.flight(d) {
                Join::Lead(g) => g,
                Join::Follow(rx) => {
                    if self.follow(&d, rx, FOLLOW_BOUND).await {
                        return Ok(());
                    }
                    // The other fetch (the cluster's) failed: this node's own turn.
                    continue;
                }
            };
            return self.complete_from_upstream(d, &url, &fwd, source).await;
        }
        Err(FetchError::Followed("the blob's fetches on this node kept failing"))
    }

    /// Completes `d` from upstream: the pieces the store lacks, fetched by byte range in runs of
    /// at most a chunk (or the whole body when upstream ignores ranges or nothing is held yet).
    /// The caller holds the digest's flight.
    async fn complete_from_upstream(&self, d: Digest, url: &reqwest::Url, fwd: &HeaderMap, source: Source) -> Result<(), FetchError> {
        inc(&self.inner.counters.upstream_completions);
        let piece = u64::from(self.inner.store.piece_size());
        let chunk_pieces = CHUNK_PIECES as usize;
        // Pieces claimed by a download that then failed are missing again on the next pass.
        for _ in 0..3 {
            if self.stored_size(&d).is_some() {
                return Ok(());
            }
            let (Some(have), Some((size, _, _))) = (self.inner.store.present_pieces(&d), self.inner.store.known_hashes(&d)) else {
                return self.fetch_whole(d, url.clone(), fwd, source).await;
            };
            let mut i = 0;
            while i < have.len() {
                if have[i] {
                    i += 1;
                    continue;
                }
                let mut end = i + 1;
                while end < have.len() && !have[end] && end - i < chunk_pieces {
                    end += 1;
                }
                let start = i as u64 * piece;
                let len = (end as u64 * piece).min(size) - start;
                let resp = self.get_range(url, fwd, start, len).await?;
                if resp.status() == reqwest::StatusCode::OK {
                    // No ranges here: the whole body, the pieces already held are skipped.
                    return self.feed_whole(d, resp, source).await;
                }
                self.feed_chunk(d, resp, start, Some(size), &source).await?;
                i = end;
            }
        }
        if self.stored_size(&d).is_some() {
            Ok(())
        } else {
            Err(FetchError::Protocol("pieces did not complete the blob with a matching sha256".into()))
        }
    }

    /// A fetch asked for by a peer (or taken over from one): `url` must be a configured upstream
    /// host, so a peer cannot make this node fetch anything else; the client's credentials, if
    /// any, go with it.
    fn for_peer(&self, url: &str, authorization: Option<&str>) -> Result<(reqwest::Url, HeaderMap, Source), FetchError> {
        let url = reqwest::Url::parse(url).map_err(|e| FetchError::BadUrl(e.to_string()))?;
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if !self.inner.upstream.allowed_origin(&url) {
            inc(&self.inner.counters.proxy_denied);
            return Err(FetchError::NotAllowed(url.origin().ascii_serialization()));
        }
        let mut fwd = HeaderMap::new();
        if let Some(a) = authorization.and_then(|a| header::HeaderValue::from_str(a).ok()) {
            fwd.insert(header::AUTHORIZATION, a);
        }
        Ok((url, fwd, Source::Upstream(host)))
    }

    /// Fetches `d` for the cluster as its owner: the first chunk's answer tells the size; a blob
    /// of several chunks is split into parts (`transfer::Part`) fetched at once by this node and
    /// the next members in rendezvous order, while this node downloads the others' parts from
    /// them. No single uplink then carries every fresh piece, and upstream sends over several
    /// connections, so one slow TCP flow (a node whose ACKs queue behind its own uploads) does
    /// not set the pace. A helper that fails is replaced by this node fetching its part.
    async fn fetch_split(&self, d: Digest, url: reqwest::Url, fwd: &HeaderMap, source: Source) -> Result<(), FetchError> {
        let Some(c) = &self.inner.cluster else { return self.fetch_whole(d, url, fwd, source).await };
        let chunk = u64::from(CHUNK_PIECES) * u64::from(self.inner.store.piece_size());
        let resp = self.get_range(&url, fwd, 0, chunk).await?;
        let total = match resp.status() {
            // No byte ranges here: the whole blob, by this node alone.
            reqwest::StatusCode::OK => return self.feed_whole(d, resp, source).await,
            reqwest::StatusCode::PARTIAL_CONTENT => content_range(&resp).map(|r| r.2).ok_or_else(|| FetchError::Protocol("sent a 206 without a usable Content-Range".into()))?,
            // An empty blob has no byte 0.
            reqwest::StatusCode::RANGE_NOT_SATISFIABLE => return self.fetch_whole(d, url, fwd, source).await,
            st => return Err(FetchError::Status(st.as_u16())),
        };
        let pieces = total.div_ceil(u64::from(self.inner.store.piece_size())) as u32;
        let me = c.peers.me();
        let helpers: Vec<SocketAddr> = transfer::ranked(&d, &c.peers.members()).into_iter().filter(|m| *m != me && !c.transfer.is_down(*m)).collect();
        let parts = (pieces.div_ceil(CHUNK_PIECES) as usize).min(MAX_PARTS).min(helpers.len() + 1);
        let part = |index: usize| transfer::Part { index: index as u8, parts: parts as u8, chunk_pieces: CHUNK_PIECES };
        let own = self.fetch_part(d, part(0), &url, fwd, source.clone(), Some(resp));
        if parts == 1 {
            own.await?;
            return if self.stored_size(&d).is_some() { Ok(()) } else { Err(FetchError::Protocol("sent a blob that did not complete".into())) };
        }
        let helpers = &helpers[..parts - 1];
        inc(&self.inner.counters.split_fetches);
        info!(%d, size = total, parts, ?helpers, "splitting the upstream fetch");
        let auth = authorization(fwd).map(str::to_owned);
        let mut asks = tokio::task::JoinSet::new();
        for (i, &helper) in helpers.iter().enumerate() {
            let (this, url, auth, p, budget) = (self.clone(), url.to_string(), auth.clone(), part(i + 1), c.owner_budget);
            let t = c.transfer.clone();
            asks.spawn(async move {
                match t.ask_fetch_part(helper, &d, p, &url, auth.as_deref(), budget).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        inc(&this.inner.counters.part_takeovers);
                        warn!(%d, %helper, part = p.index, "a helper could not fetch its part; fetching it here: {e}");
                        this.fetch_part_to_store(d, p, url, auth).await
                    }
                }
            });
        }
        let fetched = async {
            let mut all = own.await;
            while let Some(r) = asks.join_next().await {
                let r = r.unwrap_or_else(|e| Err(FetchError::Upstream(format!("a part's task failed: {e}"))));
                all = all.and(r);
            }
            all
        };
        // The helpers' parts come from them (origins while they fetch) and from everyone else
        // already holding some.
        let mut sources: Vec<(SocketAddr, bool)> = helpers.iter().map(|h| (*h, true)).collect();
        sources.extend(c.peers.members().into_iter().filter(|m| *m != me && !helpers.contains(m)).map(|m| (m, true)));
        tokio::pin!(fetched);
        let mut parts_done = false;
        // After every part is held somewhere, passes that gain nothing are bounded (a piece may
        // be withheld for a few seconds by a helper that just gave it to another node).
        let (mut idle_passes, mut held) = (0, 0);
        loop {
            if self.stored_size(&d).is_some() {
                return Ok(());
            }
            let dl = c.transfer.download_with_origins(&d, &sources, helpers.len());
            tokio::pin!(dl);
            let r = if parts_done {
                dl.await
            } else {
                tokio::select! {
                    r = &mut dl => r,
                    f = &mut fetched => {
                        f?;
                        parts_done = true;
                        dl.await
                    }
                }
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e @ transfer::TransferError::Lied { .. }) => return Err(FetchError::Cluster(e)),
                // Nothing to take yet (the parts have not started arriving), or the swarm
                // stalled while parts are still on their way: try again shortly.
                Err(_) if !parts_done => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => {
                    let now_held = self.inner.store.present_pieces(&d).map_or(0, |p| p.iter().filter(|p| **p).count());
                    idle_passes = if now_held > held { 0 } else { idle_passes + 1 };
                    held = now_held;
                    if idle_passes >= 3 {
                        // A helper holding its part went quiet (dead, or too busy to answer):
                        // the client must not pay for it. Only the missing pieces, by range.
                        warn!(%d, "the parts were fetched, the blob did not come together ({e}); fetching the missing pieces from upstream");
                        return self.complete_from_upstream(d, &url, fwd, source).await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Fetches `part` of `d` from upstream for a peer splitting the blob, once per node and
    /// part however many ask (only from configured upstream hosts, as `fetch_to_store`).
    async fn fetch_part_to_store(&self, d: Digest, part: transfer::Part, url: String, authorization: Option<String>) -> Result<(), FetchError> {
        let (url, fwd, source) = self.for_peer(&url, authorization.as_deref())?;
        let mut lead = match self.inner.part_flights.join((d, part.index), || false) {
            Join::Lead(l) => l,
            Join::Follow(f) => {
                return match f.outcome(FOLLOW_BOUND).await {
                    Some(true) => Ok(()),
                    _ => Err(FetchError::Followed("this node's fetch of that part failed")),
                };
            }
        };
        let res = self.fetch_part(d, part, &url, &fwd, source, None).await;
        if res.is_ok() {
            lead.succeeded();
        }
        res
    }

    /// GETs the chunks of `part` from upstream into the store with byte ranges, skipping chunks
    /// already held; `first` is the answer to the part's first chunk when the caller has it.
    async fn fetch_part(&self, d: Digest, part: transfer::Part, url: &reqwest::Url, fwd: &HeaderMap, source: Source, first: Option<reqwest::Response>) -> Result<(), FetchError> {
        let piece = u64::from(self.inner.store.piece_size());
        let chunk = u64::from(part.chunk_pieces) * piece;
        // The part's first chunk, always fetched, tells the blob's size and so its other chunks.
        let start = u64::from(part.index) * chunk;
        let resp = match first {
            Some(r) => r,
            None => self.get_range(url, fwd, start, chunk).await?,
        };
        let Some(total) = self.feed_chunk(d, resp, start, None, &source).await? else { return Ok(()) };
        for r in part.chunks(total.div_ceil(piece) as u32).skip(1) {
            let held = self.inner.store.present_pieces(&d).is_some_and(|have| have.get(r.start as usize..r.end as usize).is_some_and(|h| h.iter().all(|p| *p)));
            if held {
                continue;
            }
            let start = u64::from(r.start) * piece;
            let resp = self.get_range(url, fwd, start, chunk).await?;
            self.feed_chunk(d, resp, start, Some(total), &source).await?;
        }
        Ok(())
    }

    /// Checks upstream's answer to a chunk's byte range from `start` (of a blob of `total` bytes,
    /// once known) and writes it into the store; the blob's size, or `None` when the blob ends
    /// before a part's first chunk.
    async fn feed_chunk(&self, d: Digest, resp: reqwest::Response, start: u64, total: Option<u64>, source: &Source) -> Result<Option<u64>, FetchError> {
        match resp.status() {
            reqwest::StatusCode::PARTIAL_CONTENT => {}
            // Past the end: the blob is smaller than this part's first chunk.
            reqwest::StatusCode::RANGE_NOT_SATISFIABLE if total.is_none() => return Ok(None),
            st => return Err(FetchError::Status(st.as_u16())),
        }
        let (from, to, size) = content_range(&resp).ok_or_else(|| FetchError::Protocol("sent a 206 without a usable Content-Range".into()))?;
        if from != start || to < from || total.is_some_and(|t| t != size) || to >= size {
            return Err(FetchError::Protocol(format!("sent bytes {from}-{to}/{size} for a range from {start}")));
        }
        self.feed_range(d, resp, size, start, to + 1 - from, source).await?;
        Ok(Some(size))
    }

    /// Writes one upstream byte range (from `start`, `len` bytes, piece-aligned) into the store.
    async fn feed_range(&self, d: Digest, resp: reqwest::Response, size: u64, start: u64, len: u64, source: &Source) -> Result<(), FetchError> {
        let first = (start / u64::from(self.inner.store.piece_size())) as usize;
        let w = feed::PieceFeed::at(&self.inner.store, &d, size, first, source.clone()).await?;
        Ok(self.feed_body(resp, w, Some(len)).await?.finish_part().await?)
    }

    /// Writes an upstream body into `w` (exactly `len` bytes when given); on failure the feed's
    /// partial blob is given up before the error returns.
    async fn feed_body(&self, mut resp: reqwest::Response, mut w: feed::PieceFeed, len: Option<u64>) -> Result<feed::PieceFeed, FetchError> {
        let mut got = 0u64;
        loop {
            match self.upstream_chunk(&mut resp).await {
                Ok(Some(c)) => {
                    got += c.len() as u64;
                    if let Some(len) = len.filter(|len| got > *len) {
                        w.discard().await;
                        return Err(FetchError::Protocol(format!("sent more than the {len} bytes of its range")));
                    }
                    w.write(&c).await?;
                }
                Ok(None) => break,
                Err(e) => {
                    w.discard().await;
                    return Err(FetchError::from(e));
                }
            }
        }
        if let Some(len) = len.filter(|len| got != *len) {
            w.discard().await;
            return Err(FetchError::Protocol(format!("sent {got} of {len} bytes")));
        }
        Ok(w)
    }

    /// Writes a whole upstream body into `w`; when the body breaks off, the whole pieces received
    /// are kept for a ranged retry (`complete_from_upstream`) instead of being thrown away.
    async fn feed_body_keeping(&self, mut resp: reqwest::Response, mut w: feed::PieceFeed) -> Result<feed::PieceFeed, FetchError> {
        loop {
            match self.upstream_chunk(&mut resp).await {
                Ok(Some(c)) => w.write(&c).await?,
                Ok(None) => return Ok(w),
                Err(e) => {
                    w.keep_partial().await;
                    return Err(FetchError::from(e));
                }
            }
        }
    }

    /// GETs `len` bytes of the blob at `url` from `start`.
    async fn get_range(&self, url: &reqwest::Url, fwd: &HeaderMap, start: u64, len: u64) -> Result<reqwest::Response, FetchError> {
        let mut h = fwd.clone();
        let range = format!("bytes={start}-{}", start + len - 1);
        h.insert(header::RANGE, header::HeaderValue::from_str(&range).map_err(|e| FetchError::Protocol(e.to_string()))?);
        self.inner.upstream.send(Method::GET, url.clone(), &h).await.map_err(|e| FetchError::Upstream(e.to_string()))
    }

    /// GETs a whole blob from upstream into the store (piece by piece, verified at the end). The
    /// caller holds the digest's flight.
    async fn fetch_whole(&self, d: Digest, url: reqwest::Url, fwd: &HeaderMap, source: Source) -> Result<(), FetchError> {
        let resp = self.inner.upstream.send(Method::GET, url, fwd).await.map_err(|e| FetchError::Upstream(e.to_string()))?;
        self.feed_whole(d, resp, source).await
    }

    /// Writes a whole-blob answer (200) into the store.
    async fn feed_whole(&self, d: Digest, resp: reqwest::Response, source: Source) -> Result<(), FetchError> {
        if resp.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let size = resp.content_length().ok_or_else(|| FetchError::Protocol("sent no Content-Length".into()))?;
        let w = feed::PieceFeed::new(&self.inner.store, &d, size, source).await?;
        Ok(self.feed_body(resp, w, None).await?.finish().await?)
    }

    /// Joins or starts the upstream fetch of `d` on this node. A caller that checked the store
    /// before a fetch completed and gets here after it ended finds the blob stored (the leader
    /// stores it before it leaves the map) and follows a finished flight: no second fetch.
    fn flight(&self, d: Digest) -> Join<Digest> {
        self.inner.flights.join(d, || self.stored_size(&d).is_some())
    }

    /// Waits (bounded) for another request's fetch of `d`; true if the blob is now stored.
    async fn follow(&self, d: &Digest, flight: Follow, within: Duration) -> bool {
        flight.outcome(within).await;
        self.stored_size(d).is_some()
    }

    /// Starts, at most once per digest and within the concurrency bound, a background fetch of a
    /// whole blob into the store.
    fn prefetch(&self, d: Digest, url: reqwest::Url, fwd: HeaderMap, source: Source) {
        if self.stored_size(&d).is_some() {
            return;
        }
        let Ok(permit) = self.inner.prefetch_slots.clone().try_acquire_owned() else {
            inc(&self.inner.counters.prefetch_skipped);
            return;
        };
        let Join::Lead(flight) = self.flight(d) else { return };
        // The fetch flight is let go below when the cluster fetches (its own flights take over);
        // this one keeps a second prefetch of `d` from starting meanwhile.
        let Join::Lead(prefetch) = self.inner.prefetches.join(d, || false) else { return };
        inc(&self.inner.counters.prefetch_started);
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _prefetch = prefetch;
            // Peers (and the blob's owner, fetching once for the cluster) first; this node
            // fetches from upstream only when the cluster cannot help.
            if this.inner.cluster.is_some() {
                drop(flight);
                if this.get_from_cluster(&d, &url, &fwd).await {
                    info!(%d, "prefetched from the cluster");
                    return;
                }
                match this.finish_from_upstream(d, url.to_string(), authorization(&fwd).map(str::to_owned)).await {
                    Ok(()) => info!(%d, "prefetched"),
                    Err(e) => debug!(%d, "prefetch failed: {e}"),
                }
                return;
            }
            let _flight = flight;
            match this.fetch_whole(d, url, &fwd, source).await {
                Ok(()) => info!(%d, "prefetched"),
                Err(e) => debug!(%d, "prefetch failed: {e}"),
            }
        });
    }

    /// The next chunk of an upstream blob body, counted and paced by `--upstream-limit`.
    async fn upstream_chunk(&self, resp: &mut reqwest::Response) -> reqwest::Result<Option<Bytes>> {
        let c = resp.chunk().await?;
        if let Some(c) = &c {
            self.inner.counters.bytes_from_upstream.fetch_add(c.len() as u64, Ordering::Relaxed);
            if let Some(l) = &self.inner.upstream_limit {
                l.take(c.len() as u64).await;
            }
        }
        Ok(c)
    }

    /// Relays an upstream response as it is (status, the headers a client needs, body).
    async fn relay(&self, method: Method, url: reqwest::Url, fwd: &HeaderMap) -> Resp {
        match self.inner.upstream.send(method, url, fwd).await {
            Ok(r) => passthrough(r, None, self.inner.upstream_limit.clone()).await,
            Err(e) => self.upstream_failed(e),
        }
    }

    /// The agent cannot reach upstream. 502 lets containerd try its next host (hosts.toml) and
    /// tells other clients plainly what happened.
    fn upstream_failed(&self, e: upstream::UpstreamError) -> Resp {
        inc(&self.inner.counters.upstream_errors);
        warn!("{e}");
        error(502, "UNAVAILABLE", &e.to_string())
    }

    /// `/blobs/<full upstream URL>`: byte ranges of a blob in registry storage layout, served from
    /// the cache when present, otherwise relayed from the origin while the whole blob is fetched
    /// in the background. Only configured hosts: the proxy is not an open relay.
    async fn proxy(&self, head: bool, req: &Request<()>) -> Resp {
        let raw = &req.uri().path()["/blobs/".len()..];
        let raw = match req.uri().query() {
            Some(q) => format!("{raw}?{q}"),
            None => raw.to_string(),
        };
        let url = match reqwest::Url::parse(&raw) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
            _ => return error(400, "BLOB_URL_INVALID", "expected /blobs/http(s)://host/path"),
        };
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if !self.inner.upstream.allowed_origin(&url) {
            inc(&self.inner.counters.proxy_denied);
            let origin = url.origin().ascii_serialization();
            return error(403, "DENIED", &format!("{origin} is not a configured upstream origin (--registry or --blob-host, port included)"));
        }
        let Some(d) = digest_from_path(url.path()) else {
            return error(400, "DIGEST_INVALID", "no sha256 digest in the URL path (expected .../blobs/sha256/xx/<hex>/data)");
        };
        let range = range_header(req.headers());
        if let Some(size) = self.stored_size(&d) {
            // The URL (with its query, e.g. a SAS token) is the credential for blob storage.
            let cred_key = format!("{}?{}", url.path(), url.query().unwrap_or(""));
            let origin = url.origin().ascii_serialization();
            if let Err(r) = self.authorize(&origin, &cred_key, &d, url.clone(), req.headers(), false).await {
                return r;
            }
            inc(&self.inner.counters.hits);
            return self.serve_stored(&d, size, range, if_range_header(req.headers()), head, "application/octet-stream");
        }
        inc(&self.inner.counters.misses);
        let fwd = forward(req.headers(), &[header::AUTHORIZATION]);
        if head {
            return self.relay(Method::HEAD, url, &fwd).await;
        }
        if let (Some(r), true) = (range, self.inner.cluster.is_some()) {
            // From peers only for a client the origin accepts at this exact URL.
            let cred_key = format!("{}?{}", url.path(), url.query().unwrap_or(""));
            let origin = url.origin().ascii_serialization();
            if let Err(resp) = self.authorize(&origin, &cred_key, &d, url.clone(), req.headers(), false).await {
                return resp;
            }
            if let Some(resp) = self.range_from_cluster(&d, r).await {
                self.prefetch(d, url.clone(), fwd.clone(), Source::Upstream(host));
                return resp;
            }
        }
        self.prefetch(d, url.clone(), fwd.clone(), Source::Upstream(host));
        let mut with_range = fwd;
        if let Some(v) = range.and_then(|r| header::HeaderValue::from_str(r).ok()) {
            with_range.insert(header::RANGE, v);
        }
        self.relay(Method::GET, url, &with_range).await
    }
}

/// The cluster coordinator's view of this node (`cluster::Ops`): the peer directory and
/// transfer for the cluster, this mirror's own upstream fetch for "this node is the owner".
struct ClusterOps<'a> {
    mirror: &'a Mirror,
    c: &'a Cluster,
    url: &'a str,
    auth: Option<&'a str>,
}

impl crate::cluster::Ops for ClusterOps<'_> {
    fn holders(&self, d: &Digest) -> Vec<(SocketAddr, bool)> {
        self.c.peers.holders(d)
    }
    fn members(&self) -> Vec<SocketAddr> {
        self.c.peers.members()
    }
    fn me(&self) -> SocketAddr {
        self.c.peers.me()
    }
    fn is_down(&self, peer: SocketAddr) -> bool {
        self.c.transfer.is_down(peer)
    }
    async fn download(&self, d: &Digest, sources: &[(SocketAddr, bool)]) -> Result<(), transfer::TransferError> {
        self.c.transfer.download(d, sources).await
    }
    async fn ask_fetch(&self, owner: SocketAddr, d: &Digest, within: Duration) -> Result<(), transfer::TransferError> {
        self.c.transfer.ask_fetch(owner, d, self.url, self.auth, within).await
    }
    async fn fetch_here(&self, d: &Digest) -> Result<(), FetchError> {
        self.mirror.fetch_to_store(*d, self.url.to_string(), self.auth.map(str::to_owned)).await
    }
}

/// The digest a `/blobs/` URL names, in one of two exact shapes: registry storage layout ending
/// in `.../sha256/xx/<64 hex>/data`, or a registry's blob API path `/v2/<name>/blobs/sha256:<hex>`.
/// Nothing else: a digest anywhere in a path would let a URL that some other endpoint answers
/// with 2xx stand in for the blob in an access check.
pub fn digest_from_path(path: &str) -> Option<Digest> {
    let segs: Vec<&str> = path.split('/').collect();
    if let [.., alg, xx, hex, data] = segs.as_slice() {
        if *alg == "sha256" && *data == "data" && xx.len() == 2 && hex.starts_with(xx) {
            return format!("sha256:{hex}").parse().ok();
        }
    }
    match oci::parse(path) {
        Some(Ok(Route::Blob { digest, .. })) => Some(digest),
        _ => None,
    }
}

/// `(first, last, size)` from a 206's `Content-Range: bytes first-last/size`.
fn content_range(resp: &reqwest::Response) -> Option<(u64, u64, u64)> {
    parse_content_range(resp.headers().get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?)
}

/// The client's credentials, to travel with a fetch done for it.
fn authorization(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

fn range_header(h: &HeaderMap) -> Option<&str> {
    h.get(header::RANGE).and_then(|v| v.to_str().ok())
}

/// Raw bytes: an If-Range that is not valid text is still there, and matches no ETag.
fn if_range_header(h: &HeaderMap) -> Option<&[u8]> {
    h.get(header::IF_RANGE).map(|v| v.as_bytes())
}

fn forward(h: &HeaderMap, names: &[header::HeaderName]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for n in names {
        for v in h.get_all(n) {
            out.append(n.clone(), v.clone());
        }
    }
    out
}

fn set(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = header::HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// A JSON document (the admin API's serde types) as the response.
fn json_response(status: u16, v: &impl serde::Serialize) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    set(r.headers_mut(), header::CONTENT_TYPE, "application/json");
    r
}

fn simple(status: u16, body: &'static str) -> Resp {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    set(r.headers_mut(), header::CONTENT_TYPE, "application/json");
    r
}

/// An error in the distribution spec's JSON format.
pub fn error(status: u16, code: &str, message: &str) -> Resp {
    let body = oci::error_body(code, message);
    let mut r = Response::new(Body::full(body.clone()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    set(r.headers_mut(), header::CONTENT_TYPE, "application/json");
    set(r.headers_mut(), header::CONTENT_LENGTH, &body.len().to_string());
    r
}

fn rejection(r: Rejection) -> Resp {
    error(r.status, r.code, &r.message)
}

/// Upstream headers a client may need; hop-by-hop and connection-specific ones are dropped.
const PASSED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-range",
    "accept-ranges",
    "docker-content-digest",
    "docker-distribution-api-version",
    "www-authenticate",
    "etag",
    "last-modified",
];

/// Converts an upstream response to ours, streaming the body (cut at `limit` if given).
/// `limit` bounds a body read whole (error bodies); `pace` is `--upstream-limit` for a relay.
async fn passthrough(mut resp: reqwest::Response, limit: Option<usize>, pace: Option<Arc<RateLimit>>) -> Resp {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if PASSED_HEADERS.contains(&k.as_str()) {
            headers.append(k.clone(), v.clone());
        }
    }
    let body = match limit {
        Some(limit) => {
            let mut buf = Vec::new();
            while let Ok(Some(c)) = resp.chunk().await {
                buf.extend_from_slice(&c);
                if buf.len() >= limit {
                    buf.truncate(limit);
                    break;
                }
            }
            headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(buf.len()));
            Body::full(buf)
        }
        None => {
            let (tx, body) = Body::channel(8);
            tokio::spawn(async move {
                loop {
                    match resp.chunk().await {
                        Ok(Some(c)) => {
                            if let Some(l) = &pace {
                                l.take(c.len() as u64).await;
                            }
                            if tx.send(Ok(c)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                            return;
                        }
                    }
                }
            });
            body
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, String> {
    let mut buf = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| format!("upstream body: {e}"))? {
        buf.extend_from_slice(&c);
        if buf.len() > limit {
            return Err(format!("upstream manifest larger than {limit} bytes"));
        }
    }
    Ok(Bytes::from(buf))
}


/// Reads a whole response body (manifests, or a blob being cached: streamed bodies are drained
/// so the fetch completes; a cached file is not read, its length is known).
async fn collect(body: Body) -> std::io::Result<Bytes> {
    match body {
        Body::Empty => Ok(Bytes::new()),
        Body::Full(b) => Ok(b),
        Body::Stream(mut rx) => {
            let mut out = Vec::new();
            while let Some(c) = rx.recv().await {
                let c = c?;
                if out.len() < MAX_MANIFEST {
                    out.extend_from_slice(&c);
                }
            }
            Ok(Bytes::from(out))
        }
        Body::File { file, offset, len, .. } => {
            if len > MAX_MANIFEST as u64 {
                return Ok(Bytes::new());
            }
            let mut buf = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset)?;
            Ok(Bytes::from(buf))
        }
    }
}

/// Splits `registry/name:tag` (or `@digest`) into (registry, name, reference).
pub fn parse_image(image: &str) -> Option<(String, String, String)> {
    let (registry, rest) = image.split_once('/')?;
    let (name, reference) = match rest.rsplit_once('@') {
        Some((n, d)) => (n, d),
        None => match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (rest, "latest"),
        },
    };
    (!registry.is_empty() && !name.is_empty()).then(|| (registry.to_string(), name.to_string(), reference.to_string()))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl transfer::Fetcher for Mirror {
    fn fetch(
        &self,
        digest: Digest,
        url: String,
        authorization: Option<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), FetchError>> + Send + '_>> {
        Box::pin(self.fetch_to_store(digest, url, authorization))
    }

    fn fetch_part(
        &self,
        digest: Digest,
        part: transfer::Part,
        url: String,
        authorization: Option<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), FetchError>> + Send + '_>> {
        Box::pin(self.fetch_part_to_store(digest, part, url, authorization))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_from_storage_urls() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let p = format!("/container/docker/registry/v2/blobs/sha256/e3/{hex}/data");
        assert_eq!(digest_from_path(&p).unwrap().hex(), hex);
        assert_eq!(digest_from_path(&format!("/v2/a/b/blobs/sha256:{hex}")).unwrap().hex(), hex);
        assert!(digest_from_path(&format!("/x/sha256:{hex}")).is_none(), "a digest elsewhere in a path");
        assert!(digest_from_path(&format!("/v2/a/b/blobs/sha256:{hex}/x")).is_none());
        assert!(digest_from_path(&format!("/v2/a//b/blobs/sha256:{hex}")).is_none(), "non-canonical name");
        assert!(digest_from_path(&format!("/docker/registry/v2/blobs/sha256/e3/{hex}/data/more")).is_none());
        assert!(digest_from_path("/docker/registry/v2/blobs/sha256/ff/abc/data").is_none());
        assert!(digest_from_path(&format!("/docker/registry/v2/blobs/sha256/ff/{hex}/data")).is_none());
    }


    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("127.0.0.1%3A5000"), "127.0.0.1:5000");
        assert_eq!(percent_decode("docker.io"), "docker.io");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }
}
