//! Prometheus metrics (`GET /metrics` on the mirror listener). Each module renders its own
//! reason-coded counters and gauges from its atomics at scrape time (a [`MetricsSource`]; the hot
//! paths only increment atomics); this module knows none of them.
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

/// Metrics owned by one part of the agent, rendered into the exposition at scrape time.
pub trait MetricsSource: Send + Sync {
    fn render(&self, r: &mut Registry);
}

/// A counter read from an atomic at scrape time.
pub fn counter(r: &mut Registry, name: &str, help: &str, v: &AtomicU64) {
    r.register(name, help, ConstCounter::new(v.load(Ordering::Relaxed)));
}

/// A gauge read at scrape time.
pub fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    r.register(name, help, ConstGauge::new(v));
}

impl FetchLatency {
    /// Registers the histogram (shared with the live one: observations made later still count).
    pub fn register(&self, r: &mut Registry, name: &str, help: &str) {
        r.register(name, help, self.0.clone());
    }
}

/// The text exposition of every source's metrics, all under the `peerd_` prefix.
pub fn render(sources: &[&dyn MetricsSource]) -> String {
    let mut r = Registry::with_prefix("peerd");
    for src in sources {
        src.render(&mut r);
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}
