//! The cluster coordinator: gets a blob into this node's store, from wherever it is cheapest for
//! the cluster, once. The mirror asks it; it asks peers (`transfer`), the blob's rendezvous owner,
//! or upstream (`upstream`), and everything it gets lands in the `store`:
//! - single flight per digest on this node (and per split part, per prefetch);
//! - the policy for one blob (`policy`: holders, then owners in rendezvous order, then this node);
//! - this node as a blob's owner: the upstream fetch split in parts among members, a helper that
//!   fails replaced (`fetch_split`), missing pieces completed by byte range;
//! - distrust: a digest the cluster gave a wrong blob for is fetched from upstream for a while;
//! - the peer server's `Fetch`/`FetchPart` requests (`transfer::Fetcher`).
//!
//! It knows nothing of HTTP clients' requests: access checks and responses are the mirror's.
mod policy;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::{header, HeaderMap, Method};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use policy::{get, Budgets, Event, Ops, Outcome};

use crate::{
    flight::{Follow, Join, SingleFlight},
    metrics::{counter, MetricsSource},
    peers::PeerDirectory,
    store::{Digest, Source, Store},
    transfer::{self, FetchError, Transfer, TransferError},
    upstream::{authorization, content_range, feed::PieceFeed, Upstream},
};

/// A blob's owner fetches it from upstream in chunks of this many pieces (16 MiB) when it splits
/// the fetch: big enough that a request's round trip is small next to its transfer, small enough
/// that several members share even a medium-sized layer.
const CHUNK_PIECES: u32 = 16;

/// At most this many nodes fetch parts of one blob (the owner included): each is one more
/// upstream connection.
const MAX_PARTS: usize = 8;

/// How long a request waits for another request's upstream fetch of the same blob.
pub const FOLLOW_BOUND: Duration = Duration::from_secs(600);

/// How long a digest the cluster lied about is fetched from upstream directly.
const DISTRUST: Duration = Duration::from_secs(600);

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

/// Reason-coded counters of the coordinator.
#[derive(Default, Debug)]
pub struct Counters {
    pub owner_failures: AtomicU64,
    /// Blobs this node split among members as their owner (`fetch_split`).
    pub split_fetches: AtomicU64,
    /// Parts of split blobs a helper failed to fetch, fetched by the owner instead.
    pub part_takeovers: AtomicU64,
    /// Blobs the cluster delivered that failed their digest (`distrusted` for a while after).
    pub cluster_lied: AtomicU64,
    /// Swarms that stalled while the blob's owner was still fetching it, started again.
    pub swarm_retries: AtomicU64,
    /// Blobs the cluster could not finish whose missing pieces this node fetched from upstream
    /// itself (by byte range when it could), so the client's pull completes.
    pub upstream_completions: AtomicU64,
    pub prefetch_started: AtomicU64,
    pub prefetch_skipped: AtomicU64,
}

impl MetricsSource for Coordinator {
    fn render(&self, r: &mut MetricsRegistry) {
        let c = &self.inner.counters;
        counter(r, "prefetch_started", "Background whole-blob fetches started by range reads", &c.prefetch_started);
        counter(r, "prefetch_skipped", "Background fetches skipped at the concurrency bound", &c.prefetch_skipped);
        counter(r, "owner_failures", "Rendezvous owners that could not provide a blob", &c.owner_failures);
        counter(r, "split_fetches", "Blobs whose upstream fetch this node split among members as their owner", &c.split_fetches);
        counter(r, "part_takeovers", "Parts of split blobs a helper could not fetch, fetched by the owner instead", &c.part_takeovers);
        counter(r, "cluster_lied", "Blobs from peers that matched their manifest but not their digest (fetched from upstream for 10 minutes after)", &c.cluster_lied);
        counter(r, "swarm_retries", "Swarms that stalled while the blob's owner was still fetching it, started again (not a new owner)", &c.swarm_retries);
        counter(r, "upstream_completions", "Blobs the cluster could not finish, completed by this node from upstream (missing pieces only)", &c.upstream_completions);
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}


#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Option<Cluster>,
    store: Store,
    upstream: Upstream,
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
    counters: Counters,
}

impl Coordinator {
    /// `cluster`: the peers, if any (alone, every fetch is this node's own from upstream);
    /// at most `max_prefetches` background fetches run at once.
    pub fn new(store: Store, upstream: Upstream, cluster: Option<Cluster>, max_prefetches: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                cluster,
                store,
                upstream,
                flights: SingleFlight::default(),
                distrusted: Mutex::new(HashMap::new()),
                prefetch_slots: Arc::new(Semaphore::new(max_prefetches)),
                part_flights: SingleFlight::default(),
                prefetches: SingleFlight::default(),
                counters: Counters::default(),
            }),
        }
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    fn stored_size(&self, d: &Digest) -> Option<u64> {
        self.inner.store.complete_size(d)
    }

    pub(crate) fn distrusted(&self, d: &Digest) -> bool {
        let mut m = self.inner.distrusted.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        m.retain(|_, until| *until > now);
        m.contains_key(d)
    }

    pub(crate) fn distrust(&self, d: &Digest, why: &TransferError) {
        inc(&self.inner.counters.cluster_lied);
        warn!(%d, "the cluster gave a blob that fails its digest; fetching it from upstream for {DISTRUST:?}: {why}");
        self.inner.distrusted.lock().unwrap_or_else(|e| e.into_inner()).insert(*d, Instant::now() + DISTRUST);
    }

    /// Gets `d` into the store from the cluster: from peers holding it, else by asking the
    /// blob's rendezvous owner to fetch it from upstream once for everyone. `false` means "go
    /// upstream yourself" (this node is the owner, or the cluster could not help in time).
    pub(crate) async fn get_from_cluster(&self, d: &Digest, url: &reqwest::Url, fwd: &HeaderMap) -> bool {
        let Some(c) = &self.inner.cluster else { return false };
        if self.distrusted(d) {
            return false;
        }
        let ops = ClusterOps { fetch: self, c, url: url.as_str(), auth: authorization(fwd) };
        let budgets = policy::Budgets { peers: c.peer_budget, owner: c.owner_budget };
        let out = policy::get(&ops, d, budgets, |e| match e {
            policy::Event::SwarmRetry(err) => {
                inc(&self.inner.counters.swarm_retries);
                debug!(%d, "swarm stalled while the owner fetches; again: {err}");
            }
            policy::Event::OwnerFailed(owner, err) => {
                inc(&self.inner.counters.owner_failures);
                warn!(%d, %owner, "owner could not provide the blob: {err}");
            }
        })
        .await;
        match out {
            policy::Outcome::Stored => true,
            policy::Outcome::Upstream => false,
            policy::Outcome::Lied(e) => {
                self.distrust(d, &e);
                false
            }
        }
    }

    /// Fetches `d` from upstream into the store, once per node even when several peers ask at
    /// the same time (the store admits one writer; the others wait for it). Only configured
    /// upstream hosts: a peer cannot make this node fetch anything else.
    pub(crate) async fn fetch_to_store(&self, d: Digest, url: String, authorization: Option<String>) -> Result<(), FetchError> {
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
    pub(crate) async fn finish_from_upstream(&self, d: Digest, url: String, authorization: Option<String>) -> Result<(), FetchError> {
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
        if !self.inner.upstream.admits(&url) {
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
                Err(e @ TransferError::Lied { .. }) => return Err(FetchError::Cluster(e)),
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
    pub(crate) async fn fetch_part_to_store(&self, d: Digest, part: transfer::Part, url: String, authorization: Option<String>) -> Result<(), FetchError> {
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
        let w = PieceFeed::at(&self.inner.store, &d, size, first, source.clone()).await?;
        Ok(self.feed_body(resp, w, Some(len)).await?.finish_part().await?)
    }

    /// Writes an upstream body into `w` (exactly `len` bytes when given); on failure the feed's
    /// partial blob is given up before the error returns.
    async fn feed_body(&self, mut resp: reqwest::Response, mut w: PieceFeed, len: Option<u64>) -> Result<PieceFeed, FetchError> {
        let mut got = 0u64;
        loop {
            match self.inner.upstream.chunk(&mut resp).await {
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
    pub(crate) async fn feed_body_keeping(&self, mut resp: reqwest::Response, mut w: PieceFeed) -> Result<PieceFeed, FetchError> {
        loop {
            match self.inner.upstream.chunk(&mut resp).await {
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
        let w = PieceFeed::new(&self.inner.store, &d, size, source).await?;
        Ok(self.feed_body(resp, w, None).await?.finish().await?)
    }

    /// Joins or starts the upstream fetch of `d` on this node. A caller that checked the store
    /// before a fetch completed and gets here after it ended finds the blob stored (the leader
    /// stores it before it leaves the map) and follows a finished flight: no second fetch.
    pub(crate) fn flight(&self, d: Digest) -> Join<Digest> {
        self.inner.flights.join(d, || self.stored_size(&d).is_some())
    }

    /// Waits (bounded) for another request's fetch of `d`; true if the blob is now stored.
    pub(crate) async fn follow(&self, d: &Digest, flight: Follow, within: Duration) -> bool {
        flight.outcome(within).await;
        self.stored_size(d).is_some()
    }

    /// Starts, at most once per digest and within the concurrency bound, a background fetch of a
    /// whole blob into the store.
    pub(crate) fn prefetch(&self, d: Digest, url: reqwest::Url, fwd: HeaderMap, source: Source) {
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
}

/// The policy's view of this node (`policy::Ops`): the peer directory and transfer for the
/// cluster, the coordinator's own upstream fetch for "this node is the owner".
struct ClusterOps<'a> {
    fetch: &'a Coordinator,
    c: &'a Cluster,
    url: &'a str,
    auth: Option<&'a str>,
}

impl policy::Ops for ClusterOps<'_> {
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
    async fn download(&self, d: &Digest, sources: &[(SocketAddr, bool)]) -> Result<(), TransferError> {
        self.c.transfer.download(d, sources).await
    }
    async fn ask_fetch(&self, owner: SocketAddr, d: &Digest, within: Duration) -> Result<(), TransferError> {
        self.c.transfer.ask_fetch(owner, d, self.url, self.auth, within).await
    }
    async fn fetch_here(&self, d: &Digest) -> Result<(), FetchError> {
        self.fetch.fetch_to_store(*d, self.url.to_string(), self.auth.map(str::to_owned)).await
    }
}

impl transfer::Fetcher for Coordinator {
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
