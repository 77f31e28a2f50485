//! The shared real-component harness (xtask's `components`, also used by the benchmarks), plus
//! this crate's binary.
#![allow(dead_code, unused_imports)]

pub use xtask::components::*;

pub fn peerd() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_peerd"))
}

/// The value of one sample in a Prometheus text exposition: `name` is the metric name with its
/// labels as rendered (`peerd_x_total{reason="y"}`), matched exactly.
pub fn metric_value(exposition: &str, name: &str) -> Option<u64> {
    let name = name.trim_end();
    exposition.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok().map(|v| v as u64))
}
