//! Benchmarks. Each prints a side-by-side table and records it in bench/RESULTS.md under its own
//! heading, with the date and the machine.
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::{results::record, root, status};

#[derive(Subcommand, Clone)]
pub enum Which {
    /// Cost the connect4/sock_ops programs add to connect(): none vs attached-but-not-redirected vs
    /// redirected (median, p99, ratios).
    Connect,
    /// A cached blob served by the agent vs the same file served by nginx (sendfile on), same
    /// client: whole-blob throughput and server CPU per GiB; random range reads.
    Serve {
        /// Blob sizes in MiB, each measured in turn.
        #[arg(long, value_delimiter = ',', default_value = "512,1024")]
        size_mib: Vec<u64>,
        /// Alternating runs per case.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Servers on core 0, curl on core 1, all SCHED_FIFO: a quiet 2-core machine's figures
        /// on a machine shared with other work.
        #[arg(long)]
        realtime: bool,
    },
    /// One blob to N nodes over shaped links: direct from the registry vs BitTorrent (aria2) vs
    /// peerd; completion p50/max vs S/B and origin egress.
    Swarm {
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
        nodes: Vec<usize>,
        /// Link rate in Mbit/s.
        #[arg(long, default_value_t = crate::swarm_bench::RATE_MBIT)]
        rate: u32,
        /// Instead of --rate: every link at AGGREGATE / N Mbit/s, so the cluster moves bytes at
        /// the same total rate at every N and needs about the same CPU (on a small machine this
        /// separates what the swarm's design achieves from what the CPU allows). Recorded
        /// separately.
        #[arg(long)]
        aggregate_mbit: Option<u32>,
        /// Skip the BitTorrent baseline.
        #[arg(long)]
        no_bittorrent: bool,
        /// Queue of every shaped link in ms at its rate (tbf latency); see `Spec::queue_ms`.
        #[arg(long, default_value_t = xtask::netcluster::QUEUE_MS)]
        queue_ms: u32,
        /// Packets under 128 bytes (ACKs) leave each link before bulk data, as a real node's
        /// fq_codel lets sparse flows go first; see `Spec::small_first`. Recorded separately.
        #[arg(long)]
        small_packets_first: bool,
        /// Leave the VM's free page reporting on (see `GuestMemory`): page cache writes then
        /// pay for faulting memory in from the host.
        #[arg(long)]
        keep_page_reporting: bool,
    },
    /// Gossip of N agents in one process on a simulated clock (propagation, bytes per node,
    /// memory, joining, false positives/negatives, lookup latency). Content summaries are binary
    /// fuse filters (~1.4 bytes per blob per node held by every node), so 1,000 x 2,000 fits one
    /// process. `runs` get the full report (loss, partition); `scale` runs skip those and only
    /// feed the growth table, from which 5,000 nodes is extrapolated.
    Gossip {
        /// Runs as NODESxBLOBS, comma-separated, with every scenario.
        #[arg(long, value_delimiter = ',', default_value = "1000x2000")]
        runs: Vec<String>,
        /// Quick runs (no loss or partition phase) for how figures grow with nodes and blobs.
        #[arg(long, value_delimiter = ',', default_value = "250x2000,500x2000,250x500,250x8000")]
        scale: Vec<String>,
    },
    /// The swarm on a simulated clock, links only (no CPU): the real scheduler and hand-out,
    /// bytes as flows sharing each link fairly. What the design achieves where one machine
    /// cannot run the cluster for real.
    SwarmSim {
        #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
        nodes: Vec<usize>,
        /// Round trips between nodes to run, ms.
        #[arg(long, value_delimiter = ',', default_value = "2,20")]
        rtt_ms: Vec<u64>,
    },
    /// Transparent mode on one node: a cached image pulled through the eBPF redirect vs through
    /// hosts.toml vs straight from the registry.
    Redirect {
        /// Layer sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "96,32,1")]
        layers: Vec<u64>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Link rate in Mbit/s (node and registry).
        #[arg(long, default_value_t = 1000)]
        rate: u32,
    },
    /// One blob between two namespaced nodes on an unshaped veth pair, side by side: agent to
    /// agent (QUIC peer protocol) vs TLS 1.3 over kernel TCP (nginx HTTPS, curl) vs plain TCP
    /// sendfile; throughput and CPU seconds per GiB on each side.
    Transport {
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Alternating runs per case (after one untimed round).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Another build of `peerd` (e.g. a copy of main's) run as case (a0) in the same run,
        /// for before/after figures taken under the same load.
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
    },
    /// Lazy-loading range reads on the cluster harness (Azure peerd's random workload and a
    /// sequential read): direct from storage behind a slow link vs through peerd with another
    /// node holding the blob, cold, and warm.
    Range {
        #[arg(long, default_value_t = 128)]
        size_mib: u64,
        #[arg(long, default_value_t = 16)]
        readers: usize,
        #[arg(long, default_value_t = 20)]
        reads_per_reader: usize,
        /// The storage's link, Mbit/s.
        #[arg(long, default_value_t = 100)]
        storage_mbit: u32,
        /// The nodes' links, Mbit/s.
        #[arg(long, default_value_t = 1000)]
        node_mbit: u32,
    },
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Connect => connect(),
        Which::Serve { size_mib, runs, realtime } => crate::serve_bench::serve(&size_mib, runs, realtime),
        Which::Range { size_mib, readers, reads_per_reader, storage_mbit, node_mbit } => {
            crate::range_bench::run(crate::range_bench::Args { size_mib, readers, per_reader: reads_per_reader, storage_mbit, node_mbit })
        }
        Which::Gossip { runs, scale } => gossip(&runs, &scale),
        Which::Transport { size_mib, runs, baseline } => crate::transport_bench::transport(size_mib, runs, baseline.as_deref()),
        Which::SwarmSim { nodes, rtt_ms } => swarm_sim(&nodes, &rtt_ms),
        Which::Redirect { layers, rounds, rate } => crate::redirect_bench::redirect(&layers, rounds.max(1), rate),
        Which::Swarm { size_mib, nodes, rate, aggregate_mbit, no_bittorrent, queue_ms, small_packets_first, keep_page_reporting } => {
            let rate = match aggregate_mbit {
                Some(a) => crate::swarm_bench::Rate::Aggregate(a),
                None => crate::swarm_bench::Rate::PerLink(rate),
            };
            crate::swarm_bench::swarm(size_mib, &nodes, rate, queue_ms, small_packets_first, !no_bittorrent, !keep_page_reporting)
        }
    }
}

/// Builds `bin` of `package` in release (with the kernel object) and returns what it printed.
fn run_release_bin(package: &str, bin: &str, args: &[String]) -> Result<String> {
    let obj = crate::build_ebpf()?;
    status(
        Command::new("cargo")
            .current_dir(root())
            .env("PEERD_EBPF_OBJECT", &obj)
            .args(["build", "--release", "-p", package, "--bin", bin]),
    )?;
    let out = Command::new(crate::target_dir().join("release").join(bin))
        .args(args)
        .output()
        .with_context(|| format!("run {bin}"))?;
    if !out.status.success() {
        bail!("{bin} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let table = String::from_utf8(out.stdout)?;
    print!("{table}");
    Ok(table)
}

fn connect() -> Result<()> {
    let table = run_release_bin("bpf-tests", "connect-bench", &[])?;
    record("connect() overhead of the redirect programs", &table)
}

/// One run's figures, from the `<!-- figures ... -->` line gossip-sim prints.
#[derive(Debug, Default, Clone)]
struct GossipFigures {
    nodes: f64,
    blobs: f64,
    fields: std::collections::BTreeMap<String, f64>,
}

impl GossipFigures {
    fn parse(table: &str) -> Option<Self> {
        let line = table.lines().find(|l| l.starts_with("<!-- figures "))?;
        let mut figures = GossipFigures::default();
        for pair in line.trim_start_matches("<!-- figures ").trim_end_matches("-->").split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            let value: f64 = value.parse().ok()?;
            match key {
                "nodes" => figures.nodes = value,
                "blobs" => figures.blobs = value,
                _ => {
                    figures.fields.insert(key.to_string(), value);
                }
            }
        }
        Some(figures)
    }

    fn get(&self, key: &str) -> f64 {
        self.fields.get(key).copied().unwrap_or(f64::NAN)
    }
}

/// Least-squares line through (x, y); extrapolated at `at`.
fn extrapolate(points: &[(f64, f64)], at: f64) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let slope = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum::<f64>() / sxx;
    Some(my + slope * (at - mx))
}

fn parse_run(run: &str) -> Result<(usize, usize)> {
    run.split_once('x')
        .and_then(|(n, b)| Some((n.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .with_context(|| format!("runs take NODESxBLOBS, e.g. 1000x2000: {run:?}"))
}

fn gossip(runs: &[String], scale: &[String]) -> Result<()> {
    let mut tables = String::new();
    let mut figures = Vec::new();
    for (run, quick) in runs.iter().map(|r| (r, false)).chain(scale.iter().map(|r| (r, true))) {
        let (nodes, blobs) = parse_run(run)?;
        let mut args = vec!["--nodes".to_string(), nodes.to_string(), "--blobs".into(), blobs.to_string()];
        if quick {
            args.push("--quick".into());
        }
        let table = run_release_bin("peerd-sim", "gossip-sim", &args)?;
        if !quick {
            tables.push_str(&table);
            tables.push('\n');
        }
        figures.extend(GossipFigures::parse(&table));
    }
    figures.sort_by(|a, b| (a.blobs, a.nodes).partial_cmp(&(b.blobs, b.nodes)).unwrap_or(std::cmp::Ordering::Equal));
    let mut growth = String::from(
        "How the per-node figures grow (quick runs skip loss and partition; findability is the clean run):\n\n\
         | nodes x blobs | heap MB | discovery MB | membership MB | steady KB/s | findable 50/99/100% ms | join ms | false holders per miss | false negatives | who_has p99 us |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in &figures {
        growth.push_str(&format!(
            "| {} x {} | {:.1} | {:.2} | {:.2} | {:.1} | {} / {} / {} | {} | {:.3} | {} | {:.2} |\n",
            f.nodes, f.blobs, f.get("heap_mb"), f.get("discovery_mb"), f.get("membership_mb"), f.get("steady_kbs"),
            f.get("p50_ms"), f.get("p99_ms"), f.get("p100_ms"), f.get("join_ms"), f.get("fp_per_miss"), f.get("fn"), f.get("lookup_p99_us"),
        ));
    }
    // 5,000 nodes: a straight line in nodes through the runs with the most common blob count.
    let blobs = figures.iter().map(|f| f.blobs).fold(f64::NAN, f64::max).min(2000.0);
    let line = |key: &str| -> Option<f64> {
        let points: Vec<(f64, f64)> = figures.iter().filter(|f| f.blobs == blobs).map(|f| (f.nodes, f.get(key))).collect();
        extrapolate(&points, 5000.0)
    };
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    growth.push_str(&format!(
        "\nExtrapolated, not measured: 5,000 nodes x {blobs} blobs, a least-squares line in nodes through the {blobs}-blob runs above: heap {} MB per node (discovery {} MB, membership {} MB; target <= 64 MB), who_has p99 {} us (per layout group one hash and three row reads, plus about a byte per node read in order: linear in nodes with a small slope). Steady-state bytes do not follow the line: the anti-entropy budget caps them (16,000 B/s plus rumors).\n",
        show(line("heap_mb")), show(line("discovery_mb")), show(line("membership_mb")), show(line("lookup_p99_us")),
    ));
    record("Gossip: propagation, bandwidth, memory, lookup (simulated)", &format!(
        "All agents in one process on tokio's paused clock, chitchat's in-memory transport plus the rumor network (sealing overhead added to byte counts), default `--gossip-budget`. Content summaries are binary fuse filters (PROTOCOL.md). Targets at 1,000 nodes x 2,000 blobs: <= 16 MB per node, <= 20 KB/s per node steady state, p99 findability <= 1 s, a joining node complete within 10 s, no false negatives once converged, who_has p99 <= 10 us; at 5,000 x 2,000 (extrapolated) <= 64 MB per node.\n\n{tables}{growth}"
    ))
}

fn swarm_sim(nodes: &[usize], rtts: &[u64]) -> Result<()> {
    let list = nodes.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut tables = String::new();
    for rtt in rtts {
        let table = run_release_bin("peerd-sim", "swarm-sim", &["--nodes".into(), list.clone(), "--rtt-ms".into(), rtt.to_string()])?;
        tables.push_str(&format!("Round trip {rtt} ms, the agent's split fetch:\n\n{table}\n"));
    }
    let rtt = rtts.first().copied().unwrap_or(2);
    let table = run_release_bin("peerd-sim", "swarm-sim", &["--nodes".into(), list, "--rtt-ms".into(), rtt.to_string(), "--parts".into(), "1".into()])?;
    tables.push_str(&format!("Round trip {rtt} ms, one owner fetching the whole blob (before the split fetch):\n\n{table}\n"));
    record("Swarm, simulated: links only", &format!(
        "One 256 MiB blob (1 MiB pieces) to N nodes, every link 200 Mbit/s both ways, upstream's uplink too. Upstream sends the blob once (3.5% TCP overhead): split as the agent splits it (`Coordinator::fetch_split`: parts of interleaved 16-piece chunks, one per node for up to 8 nodes, the owner first, all parts at once sharing upstream's uplink), or all of it to the owner. Every node runs the agent's scheduler (`transfer::swarm`: the owner's download has the part fetchers as origins, everyone else's the owner) and bitfield polling (`Download::bitfield_polls`), every node holding pieces from upstream the agent's hand-out (`transfer::handout`). Bytes move as fluid flows sharing each uplink and downlink max-min fairly, with 4.5% QUIC overhead; no CPU, packets, congestion control or disk (`peerd-sim`'s `swarm`). Times are per-node completion / (S/B); owner upload counts wire bytes.\n\n{tables}"
    ))
}
