//! The mirror's reason-coded counters: every drop, fallback and source of a served byte.
use std::sync::atomic::AtomicU64;

use prometheus_client::registry::Registry;

use crate::metrics::{counter, FetchLatency, MetricsSource};

/// Reason-coded counters (exported as metrics).
#[derive(Default, Debug)]
pub struct Counters {
    pub hits: AtomicU64,
    pub hits_from_peers: AtomicU64,
    /// Responses streamed while the blob was still arriving (`stream_arriving`).
    pub streamed_arriving: AtomicU64,
    /// Streamed responses whose blob the cluster failed to finish (upstream finished it).
    pub stream_fallbacks: AtomicU64,
    /// Streamed responses cut short: the blob did not arrive whole and verified.
    pub stream_aborted: AtomicU64,
    /// Requests for content named by a digest the store does not use (sha512), relayed uncached.
    pub relayed_uncacheable: AtomicU64,
    /// Range reads of blobs not here answered with pieces from peers.
    pub ranges_from_peers: AtomicU64,
    /// Range reads that tried peers and were relayed from upstream instead.
    pub range_peer_fallbacks: AtomicU64,
    /// accept() failures on the mirror listener (out of descriptors), retried after a pause.
    pub accept_errors: AtomicU64,
    /// Connections answered 503 and closed at the connection limit.
    pub connections_shed: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_from_cache: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub auth_checks: AtomicU64,
    pub auth_denied: AtomicU64,
    pub digest_mismatch: AtomicU64,
    pub cache_skipped: AtomicU64,
    pub fetch_seconds: FetchLatency,
}

impl MetricsSource for Counters {
    fn render(&self, r: &mut Registry) {
        let c = self;
        counter(r, "cache_hits", "Requests served from this node's cache", &c.hits);
        counter(r, "peer_hits", "Misses served after fetching the blob from peers", &c.hits_from_peers);
        counter(r, "cache_misses", "Requests for content not in the cache", &c.misses);
        counter(r, "served_from_cache_bytes", "Bytes sent to clients from the cache", &c.bytes_from_cache);
        counter(r, "upstream_errors", "Upstream requests that failed (connect, timeout, body)", &c.upstream_errors);
        counter(r, "auth_checks", "Upstream access checks made for cached content", &c.auth_checks);
        counter(r, "auth_denied", "Requests refused because upstream denied or could not confirm access", &c.auth_denied);
        counter(r, "digest_mismatches", "Upstream bodies that did not match their digest", &c.digest_mismatch);
        counter(r, "cache_skipped", "Fetches relayed without caching (budget, concurrent writer)", &c.cache_skipped);
        counter(r, "streamed_arriving", "Responses streamed piece by piece while the blob was still arriving", &c.streamed_arriving);
        counter(r, "stream_fallbacks", "Streamed responses the cluster failed to finish; upstream finished them", &c.stream_fallbacks);
        counter(r, "accept_errors", "Mirror accept() failures (e.g. out of file descriptors), retried after a pause", &c.accept_errors);
        counter(r, "connections_shed", "Mirror connections answered 503 at the connection limit (--max-connections)", &c.connections_shed);
        counter(r, "ranges_from_peers", "Range reads of blobs not held here answered with verified pieces from peers", &c.ranges_from_peers);
        counter(r, "range_peer_fallbacks", "Range reads that tried peers and were relayed from upstream instead", &c.range_peer_fallbacks);
        counter(r, "relayed_uncacheable", "Requests for content named by a sha512 digest, relayed to the registry uncached", &c.relayed_uncacheable);
        counter(r, "stream_aborted", "Streamed responses cut short: the blob did not arrive whole with a matching sha256", &c.stream_aborted);
        c.fetch_seconds.register(r, "blob_fetch_seconds", "Seconds from a miss to a verified blob, by source (cluster: peers or the owner; upstream: this node)");
    }
}
