//! Prometheus metrics (`GET /metrics` on the mirror listener): the reason-coded counters of the
//! mirror and of peer transfer, and the store's gauges, rendered with prometheus-client from the
//! modules' own atomics at scrape time (the hot paths only increment atomics).
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::ConstCounter,
        family::Family,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::mirror::Mirror;

/// Latency of whole-blob fetches by where the blob came from ("cluster": peers or the blob's
/// owner; "upstream": this node's own pull-through), seconds from the miss to a verified blob.
#[derive(Debug)]
pub struct FetchLatency(Family<Labels, Histogram, fn() -> Histogram>);

type Labels = Vec<(String, String)>;

fn fetch_buckets() -> Histogram {
    // 10 ms .. ~164 s, doubling.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

impl Default for FetchLatency {
    fn default() -> Self {
        Self(Family::new_with_constructor(fetch_buckets))
    }
}

impl FetchLatency {
    pub fn observe(&self, source: &str, elapsed: std::time::Duration) {
        self.0.get_or_create(&vec![("source".to_string(), source.to_string())]).observe(elapsed.as_secs_f64());
    }
}

/// Metrics owned by another part of the agent (transparent mode's kernel counters), rendered
/// into the same exposition at scrape time.
pub trait MetricsSource: Send + Sync {
    fn render(&self, r: &mut Registry);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: &AtomicU64) {
    r.register(name, help, ConstCounter::new(v.load(Ordering::Relaxed)));
}

/// The text exposition of every metric.
pub fn render(m: &Mirror) -> String {
    let mut r = Registry::with_prefix("peerd");
    let c = m.counters();
    counter(&mut r, "cache_hits", "Requests served from this node's cache", &c.hits);
    counter(&mut r, "peer_hits", "Misses served after fetching the blob from peers", &c.hits_from_peers);
    counter(&mut r, "cache_misses", "Requests for content not in the cache", &c.misses);
    counter(&mut r, "served_from_cache_bytes", "Bytes sent to clients from the cache", &c.bytes_from_cache);
    counter(&mut r, "upstream_bytes", "Bytes fetched from upstream registries and blob stores", &c.bytes_from_upstream);
    counter(&mut r, "upstream_errors", "Upstream requests that failed (connect, timeout, body)", &c.upstream_errors);
    counter(&mut r, "auth_checks", "Upstream access checks made for cached content", &c.auth_checks);
    counter(&mut r, "auth_denied", "Requests refused because upstream denied or could not confirm access", &c.auth_denied);
    counter(&mut r, "digest_mismatches", "Upstream bodies that did not match their digest", &c.digest_mismatch);
    counter(&mut r, "cache_skipped", "Fetches relayed without caching (budget, concurrent writer)", &c.cache_skipped);
    counter(&mut r, "prefetch_started", "Background whole-blob fetches started by range reads", &c.prefetch_started);
    counter(&mut r, "prefetch_skipped", "Background fetches skipped at the concurrency bound", &c.prefetch_skipped);
    counter(&mut r, "proxy_denied", "Requests for hosts that are not configured upstreams", &c.proxy_denied);
    counter(&mut r, "owner_failures", "Rendezvous owners that could not provide a blob", &c.owner_failures);
    counter(&mut r, "split_fetches", "Blobs whose upstream fetch this node split among members as their owner", &c.split_fetches);
    counter(&mut r, "part_takeovers", "Parts of split blobs a helper could not fetch, fetched by the owner instead", &c.part_takeovers);
    counter(&mut r, "streamed_arriving", "Responses streamed piece by piece while the blob was still arriving", &c.streamed_arriving);
    counter(&mut r, "stream_fallbacks", "Streamed responses the cluster failed to finish; upstream finished them", &c.stream_fallbacks);
    counter(&mut r, "cluster_lied", "Blobs from peers that matched their manifest but not their digest (fetched from upstream for 10 minutes after)", &c.cluster_lied);
    counter(&mut r, "accept_errors", "Mirror accept() failures (e.g. out of file descriptors), retried after a pause", &c.accept_errors);
    counter(&mut r, "connections_shed", "Mirror connections answered 503 at the connection limit (--max-connections)", &c.connections_shed);
    counter(&mut r, "peer_addrs_ignored", "Peer addresses from gossip that cannot be dialled from here (wildcard, port 0, foreign loopback), ignored", &crate::peers::IGNORED_PEER_ADDRS);
    counter(&mut r, "ranges_from_peers", "Range reads of blobs not held here answered with verified pieces from peers", &c.ranges_from_peers);
    counter(&mut r, "range_peer_fallbacks", "Range reads that tried peers and were relayed from upstream instead", &c.range_peer_fallbacks);
    counter(&mut r, "relayed_uncacheable", "Requests for content named by a sha512 digest, relayed to the registry uncached", &c.relayed_uncacheable);
    counter(&mut r, "swarm_retries", "Swarms that stalled while the blob's owner was still fetching it, started again (not a new owner)", &c.swarm_retries);
    counter(&mut r, "upstream_completions", "Blobs the cluster could not finish, completed by this node from upstream (missing pieces only)", &c.upstream_completions);
    counter(&mut r, "stream_aborted", "Streamed responses cut short: the blob did not arrive whole with a matching sha256", &c.stream_aborted);
    if let Some(cl) = m.cluster() {
        let t = cl.transfer.counters();
        counter(&mut r, "peer_received_bytes", "Bytes received from peers", &t.bytes_from_peers);
        counter(&mut r, "peer_sent_bytes", "Bytes sent to peers", &t.bytes_to_peers);
        counter(&mut r, "peer_pieces", "Verified pieces received from peers", &t.pieces_from_peers);
        counter(&mut r, "piece_verification_failures", "Pieces from peers that failed blake3 verification", &t.corrupt_pieces);
        counter(&mut r, "peer_timeouts", "Piece requests to peers that timed out", &t.peer_timeouts);
        counter(&mut r, "peer_hedged_requests", "Piece requests duplicated to a second peer in the endgame (the first was slow)", &t.hedged_requests);
        counter(&mut r, "peer_withheld_pieces", "Piece requests refused as a blob's origin: the pieces had just gone to another peer", &t.withheld_pieces);
        counter(&mut r, "peer_errors", "Piece requests to peers that failed", &t.peer_errors);
        counter(&mut r, "peers_unreachable", "Dials that failed and peer connections that timed out", &t.peers_unreachable);
        counter(&mut r, "peer_refused", "Peer connections or requests refused (no cluster certificate, malformed)", &t.refused_requests);
        counter(&mut r, "peer_fetches", "Upstream fetches done for peers as rendezvous owner", &t.fetches_for_peers);
        counter(&mut r, "peer_part_fetches", "Parts of split blobs fetched from upstream for the node that split them", &t.part_fetches_for_peers);
        r.register("members", "Live cluster members known to this node, itself included", ConstGauge::new(cl.peers.members().len() as i64));
        if let Some(cc) = cl.transfer.containerd() {
            let c = cc.counters();
            counter(&mut r, "containerd_verified", "Blobs in containerd's content store verified (sha256) and hashed into pieces on first use", &c.verified);
            counter(&mut r, "containerd_verify_failed", "Blobs in containerd's content store whose content did not match their name (never served)", &c.verify_failed);
            counter(&mut r, "containerd_changed", "Blobs in containerd's content store withdrawn because they changed or vanished while in use", &c.changed);
            counter(&mut r, "containerd_removed", "Blobs removed from containerd's content store and withdrawn", &c.removed);
            counter(&mut r, "containerd_read_errors", "Reads of containerd's content store that failed", &c.read_errors);
            counter(&mut r, "containerd_sent_bytes", "Bytes sent to peers from containerd's content store", &c.bytes_served);
            counter(&mut r, "containerd_scan_errors", "Scans of containerd's content store that could not list it", &c.scan_errors);
            counter(&mut r, "containerd_scan_truncated", "Entries of containerd's content store ignored past the per-scan bound", &c.scan_truncated);
            r.register("containerd_blobs", "Blobs of containerd's content store advertised to peers", ConstGauge::new(cc.len() as i64));
        }
    }
    let s = m.store().stats();
    r.register("store_used_bytes", "Bytes reserved by cached blobs", ConstGauge::new(s.used_bytes as i64));
    r.register("store_budget_bytes", "Cache budget", ConstGauge::new(s.budget_bytes as i64));
    r.register("store_blobs", "Blobs in the cache, complete or partial", ConstGauge::new(s.blobs as i64));
    r.register("store_complete_blobs", "Complete, verified blobs in the cache", ConstGauge::new(s.complete_blobs as i64));
    r.register("store_evictions", "Blobs evicted to stay within the budget", ConstCounter::new(s.evictions));
    r.register("blob_fetch_seconds", "Seconds from a miss to a verified blob, by source (cluster: peers or the owner; upstream: this node)", c.fetch_seconds.0.clone());
    for src in m.metrics_sources() {
        src.render(&mut r);
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}
