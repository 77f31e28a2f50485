//! The gossip simulator end to end at a size a test can afford: the agents' own gossip
//! converges, every held blob is findable (no false negatives) and a new advertisement reaches
//! every node. The 1,000-node figures come from `cargo xtask bench gossip`.
use std::time::Duration;

use peerd_sim::gossip::{run, SimOptions};

fn figure<'a>(report: &'a str, key: &str) -> &'a str {
    let line = report.lines().find(|l| l.starts_with("<!-- figures")).expect("figures line");
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn thirty_members_converge_and_find_every_held_blob() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let opts = SimOptions {
        nodes: 30,
        blobs: 100,
        interval: Duration::from_millis(100),
        budget: 16_000,
        loss: 0.0,
        seed: 7,
        max_wait: Duration::from_secs(120),
        quick: true,
    };
    let report = runtime.block_on(run(opts, || 0));
    assert_eq!(figure(&report, "fn"), "0", "false negatives:\n{report}");
    let p100: u64 = figure(&report, "p100_ms").parse().unwrap_or_else(|_| panic!("an advertisement never reached everyone:\n{report}"));
    assert!(p100 <= 2_000, "{p100} ms to reach all 30:\n{report}");
    let join: u64 = figure(&report, "join_ms").parse().unwrap_or_else(|_| panic!("the joining node never completed:\n{report}"));
    assert!(join <= 10_000, "{join} ms to join:\n{report}");
}
