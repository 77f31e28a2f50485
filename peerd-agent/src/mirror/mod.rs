//! The node's registry mirror: the OCI distribution pull API and the `/blobs/<url>` range proxy.
//!
//! request -> mirror -> store (hit) | upstream (miss). Peers (`transfer`) slot in before upstream
//! once they exist. Every cached byte a client gets was verified (the store only exposes blobs
//! whose sha256 matched); bytes relayed on a miss come straight from the origin and the last
//! chunk is held back until the whole body's sha256 matches, so a client never receives a complete
//! body with the wrong digest.

mod admin_api;
mod counters;
pub mod oci;
pub use peerd_http::range;

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
};
use tracing::{debug, info, warn};

use crate::{
    cluster::Coordinator,
    flight::Join,
    httpd,
    metrics::MetricsSource,
    admin,
    ratelimit::RateLimit,
    store::{Digest, Source, Store},
    transfer::{self, FetchError},
};
use oci::{Reference, Rejection, Route};
use range::RangeAnswer;
pub use crate::upstream::{Registries, Registry, Upstream};
pub use crate::cluster::Cluster;
use crate::upstream::{self, authorization};

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




fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}


/// Bound on answering a range read from peers before it is relayed from upstream instead.
const RANGE_BUDGET: Duration = Duration::from_secs(10);

use crate::cluster::FOLLOW_BOUND;

#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}


struct Inner {
    cfg: MirrorConfig,
    store: Store,
    /// Gets blobs into the store (peers, owner, upstream), once.
    fetch: Coordinator,
    upstream: Upstream,
    /// Media types of cached manifests (`<hex>` -> type); the store keeps bytes only.
    media_dir: PathBuf,
    /// sha256(registry, repository, credential) -> when upstream last confirmed access.
    auth: Mutex<HashMap<[u8; 32], Instant>>,
    /// Verified manifests (from complete holders) of blobs read by range, not yet here whole.
    range_manifests: Mutex<HashMap<Digest, Arc<transfer::wire::WireManifest>>>,
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
        let upstream = Upstream::new(cfg.connect_timeout, cfg.head_timeout, cfg.read_timeout, origins, cfg.upstream_limit)?;
        let fetch = Coordinator::new(store.clone(), upstream.clone(), cluster, cfg.max_prefetches);
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                store,
                fetch,
                upstream,
                media_dir,
                auth: Mutex::new(HashMap::new()),
                range_manifests: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                metrics_sources: Mutex::new(Vec::new()),
                node: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The cluster coordinator this mirror fetches through (the peer server answers peers'
    /// fetch requests with it).
    pub fn coordinator(&self) -> &Coordinator {
        &self.inner.fetch
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
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
        self.inner.fetch.cluster()
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
        if self.inner.fetch.cluster().is_some() {
            // Content from peers is still this client's only if the registry says so.
            if let Err(r) = self.authorize(&reg.name, name, &d, url.clone(), h, true).await {
                return r;
            }
            if let Some(range) = range_header(h) {
                // A byte range of a blob not here: the pieces covering it, from peers that hold
                // the blob verified; the rest of the blob in the background, peers first.
                if let Some(resp) = self.range_from_cluster(&d, range).await {
                    self.inner.fetch.prefetch(d, url.clone(), fwd, Source::Upstream(reg.name.clone()));
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
                tokio::spawn(async move { this.inner.fetch.get_from_cluster(&d, &url, &fwd).await })
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
                        let fallback = async move { this.inner.fetch.finish_from_upstream(d, url.to_string(), auth).await };
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
        self.inner.fetch.prefetch(d, url.clone(), fwd, source);
        self.relay(Method::GET, url, &with_range).await
    }

    /// Answers `range` of `d` from the pieces covering it: those already here, the rest from
    /// peers holding the blob complete, each piece checked against that holder's verified
    /// manifest (`VerifiedManifest`: hashes of a blob whose sha256 it checked). Nothing outside
    /// the range is waited for. `None` when no peer can (the caller relays from upstream).
    async fn range_from_cluster(&self, d: &Digest, range: &str) -> Option<Resp> {
        let c = self.inner.fetch.cluster()?;
        if self.inner.fetch.distrusted(d) {
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
                            self.inner.fetch.distrust(d, &transfer::TransferError::Lied { peer: second, msg: format!("its verified manifest differs from {first}'s") });
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
                this.inner.fetch.finish_from_upstream(d, url, auth).await
            }
        };
        let flight = match self.inner.fetch.flight(d) {
            Join::Lead(g) => g,
            Join::Follow(rx) => {
                // Another request is fetching it: read along with that fetch.
                let this = self.clone();
                let mut job = tokio::spawn(async move { this.inner.fetch.follow(&d, rx, FOLLOW_BOUND).await });
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
            Some(s) => match crate::upstream::feed::PieceFeed::new(&self.inner.store, &d, s, source.clone()).await {
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
                match this.inner.fetch.feed_body_keeping(resp, writer).await {
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
                match this.inner.upstream.chunk(&mut resp).await {
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

    /// Relays an upstream response as it is (status, the headers a client needs, body).
    async fn relay(&self, method: Method, url: reqwest::Url, fwd: &HeaderMap) -> Resp {
        match self.inner.upstream.send(method, url, fwd).await {
            Ok(r) => passthrough(r, None, self.inner.upstream.limit()).await,
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
        if !self.inner.upstream.admits(&url) {
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
        if let (Some(r), true) = (range, self.inner.fetch.cluster().is_some()) {
            // From peers only for a client the origin accepts at this exact URL.
            let cred_key = format!("{}?{}", url.path(), url.query().unwrap_or(""));
            let origin = url.origin().ascii_serialization();
            if let Err(resp) = self.authorize(&origin, &cred_key, &d, url.clone(), req.headers(), false).await {
                return resp;
            }
            if let Some(resp) = self.range_from_cluster(&d, r).await {
                self.inner.fetch.prefetch(d, url.clone(), fwd.clone(), Source::Upstream(host));
                return resp;
            }
        }
        self.inner.fetch.prefetch(d, url.clone(), fwd.clone(), Source::Upstream(host));
        let mut with_range = fwd;
        if let Some(v) = range.and_then(|r| header::HeaderValue::from_str(r).ok()) {
            with_range.insert(header::RANGE, v);
        }
        self.relay(Method::GET, url, &with_range).await
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
