//! Swarm simulation: one blob to N nodes on a simulated clock, links only (no CPU); prints
//! Markdown rows. `cargo run --release -p peerd-sim --bin swarm-sim -- --nodes 4,8,16`

use clap::Parser;
use peerd_sim::swarm::{self as sim, SimConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
    nodes: Vec<usize>,
    /// Blob size in MiB (1 MiB pieces).
    #[arg(long, default_value_t = 256)]
    size_mib: u32,
    /// Link rate in Mbit/s.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Requests in flight per peer (default: the agent's).
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// Requests in flight at an origin still receiving the blob (default: the agent's).
    #[arg(long)]
    origin_in_flight: Option<u32>,
    /// Nodes fetching parts of the blob from upstream (default: the agent's, up to 8; 1: the
    /// owner fetches it all).
    #[arg(long)]
    parts: Option<usize>,
    /// Bitfield poll interval, ms (default: the agent's).
    #[arg(long)]
    have_every_ms: Option<u64>,
    /// Round trip between nodes, ms.
    #[arg(long, default_value_t = 2)]
    rtt_ms: u64,
}

fn main() {
    let args = Args::parse();
    println!("| N | parts | p50 / (S/B) | max / (S/B) | upstream done / (S/B) | owner upload / S (while fetching) | duplicate pieces |");
    println!("|---|---|---|---|---|---|---|");
    for n in args.nodes {
        let mut cfg = SimConfig::new(n);
        cfg.pieces = args.size_mib;
        cfg.rate = f64::from(args.rate) * 1e6 / 8.0;
        cfg.rtt = std::time::Duration::from_millis(args.rtt_ms);
        if let Some(v) = args.max_in_flight {
            cfg.swarm.max_in_flight_per_peer = v;
        }
        if let Some(v) = args.have_every_ms {
            cfg.have_every = std::time::Duration::from_millis(v);
        }
        if let Some(v) = args.parts {
            cfg.parts = v;
        }
        if let Some(v) = args.origin_in_flight {
            cfg.swarm.origin_in_flight = v;
        }
        let ideal = f64::from(args.size_mib) * (1u64 << 20) as f64 / cfg.rate;
        let r = sim::run(&cfg);
        let mut t: Vec<f64> = r.done.iter().map(|x| x / ideal).collect();
        t.sort_by(|a, b| a.total_cmp(b));
        let parts = cfg.parts.clamp(1, n);
        println!("| {n} | {parts} | {:.2}x | {:.2}x | {:.2}x | {:.2}x ({:.2}x) | {} |", t[t.len() / 2], t[t.len() - 1], r.upstream_done / ideal, r.origin_upload, r.origin_upload_fetching, r.duplicates);
    }
}
