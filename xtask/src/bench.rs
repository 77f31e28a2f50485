//! Benchmarks. Each prints a side-by-side table and records it in bench/RESULTS.md under its own
//! heading, with the date and the machine.
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::{root, status};

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
    /// memory, lookup latency). Every simulated node holds every other's state, so memory grows
    /// with nodes^2 x blobs and 1,000 x 10,000 does not fit one process; the default runs 1,000
    /// nodes with few blobs (membership, propagation and bandwidth at scale: steady-state
    /// traffic does not depend on the blob count) and 100 nodes with 10,000 blobs each (content
    /// encoding, index memory, lookups).
    Gossip {
        /// Runs as NODESxBLOBS, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000x10,100x10000")]
        runs: Vec<String>,
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
        Which::Gossip { runs } => gossip(&runs),
        Which::Transport { size_mib, runs } => crate::transport_bench::transport(size_mib, runs),
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

fn gossip(runs: &[String]) -> Result<()> {
    let mut tables = String::new();
    for run in runs {
        let Some((nodes, blobs)) = run.split_once('x').and_then(|(n, b)| Some((n.parse::<usize>().ok()?, b.parse::<usize>().ok()?))) else {
            bail!("--runs takes NODESxBLOBS, e.g. 1000x10: {run:?}");
        };
        let table = run_release_bin("peerd-agent", "gossip-sim", &["--nodes".into(), nodes.to_string(), "--blobs".into(), blobs.to_string()])?;
        tables.push_str(&table);
        tables.push('\n');
    }
    record("Gossip: propagation, bandwidth, memory, lookup (simulated)", &format!(
        "All agents in one process on tokio's paused clock, chitchat's in-memory transport plus the rumor network (sealing overhead added to byte counts), default `--gossip-budget`. Targets: p99 propagation <= 1 s at 1,000 nodes with a 100 ms interval, <= 20 KB/s per node with 10,000 blobs per node, lookup p99 <= 10 us. Every simulated node holds all others' state, so 1,000 x 10,000 does not fit one process: 1,000 nodes run with few blobs (steady-state traffic does not depend on the blob count: summaries change only when content does), 100 nodes with 10,000 blobs each.\n\n{tables}"
    ))
}

fn swarm_sim(nodes: &[usize], rtts: &[u64]) -> Result<()> {
    let list = nodes.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut tables = String::new();
    for rtt in rtts {
        let table = run_release_bin("peerd-agent", "swarm-sim", &["--nodes".into(), list.clone(), "--rtt-ms".into(), rtt.to_string()])?;
        tables.push_str(&format!("Round trip {rtt} ms, the agent's split fetch:\n\n{table}\n"));
    }
    let rtt = rtts.first().copied().unwrap_or(2);
    let table = run_release_bin("peerd-agent", "swarm-sim", &["--nodes".into(), list, "--rtt-ms".into(), rtt.to_string(), "--parts".into(), "1".into()])?;
    tables.push_str(&format!("Round trip {rtt} ms, one owner fetching the whole blob (before the split fetch):\n\n{table}\n"));
    record("Swarm, simulated: links only", &format!(
        "One 256 MiB blob (1 MiB pieces) to N nodes, every link 200 Mbit/s both ways, upstream's uplink too. Upstream sends the blob once (3.5% TCP overhead): split as the agent splits it (`Mirror::fetch_split`: parts of interleaved 16-piece chunks, one per node for up to 8 nodes, the owner first, all parts at once sharing upstream's uplink), or all of it to the owner. Every node runs the agent's scheduler (`transfer::swarm`: the owner's download has the part fetchers as origins, everyone else's the owner) and bitfield polling, every node holding pieces from upstream the agent's hand-out (`transfer::handout`). Bytes move as fluid flows sharing each uplink and downlink max-min fairly, with 4.5% QUIC overhead; no CPU, packets, congestion control or disk (`transfer::sim`). Times are per-node completion / (S/B); owner upload counts wire bytes.\n\n{tables}"
    ))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {kernel}")
}

/// Replaces (or appends) the section `## {title}` of bench/RESULTS.md.
pub fn record(title: &str, body: &str) -> Result<()> {
    let path = root().join("bench/RESULTS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmark results\n\nWritten by `cargo xtask bench ...`; each section is replaced when its benchmark runs again.\n".into());
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    let section = format!("## {title}\n\n{date}, {}.\n\n{}\n", machine(), body.trim_end());
    let heading = format!("## {title}\n");
    let new = match old.find(&heading) {
        Some(start) => {
            let rest = &old[start + heading.len()..];
            let end = rest.find("\n## ").map(|i| start + heading.len() + i + 1).unwrap_or(old.len());
            format!("{}{}\n{}", &old[..start], section, &old[end..]).trim_end().to_string() + "\n"
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::create_dir_all(path.parent().context("bench dir")?)?;
    std::fs::write(&path, new)?;
    println!("recorded in {}", path.display());
    Ok(())
}

const PAGE_REPORTING: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// Memory the kernel keeps for this benchmark's writes. A VM with free page reporting (virtio
/// balloon) hands 2 MiB blocks the guest frees back to its host; the next write into such a page
/// faults it in from the host, which on the machine the results were taken on costs ~2 s per GiB
/// against ~0.25 s for memory the guest kept (`dd` of 3 GiB: 5.9 s vs 0.86 s). Every method writes
/// each node's copy of the blob into the page cache, so at N=16 that tax alone would be ~8 of the
/// run's ~21 core-seconds: the VM's, not any method's. While this guard lives reporting is off
/// (the order above the largest buddy order: the kernel reports nothing) and `bytes` of memory
/// were touched once and freed, so page cache writes reuse memory the guest owns, as on a
/// machine without a balloon. Dropped, it restores the setting. Absent the knob, it does nothing.
pub struct GuestMemory {
    saved: Option<String>,
}

impl GuestMemory {
    pub fn keep(bytes: u64) -> Self {
        let Ok(saved) = std::fs::read_to_string(PAGE_REPORTING) else {
            return Self { saved: None };
        };
        // NR_PAGE_ORDERS on x86-64 (MAX_PAGE_ORDER 10 + 1): no free block is that large.
        if std::fs::write(PAGE_REPORTING, "11").is_err() {
            eprintln!("bench: could not turn off free page reporting; writes may fault memory in from the host");
            return Self { saved: None };
        }
        // Never more than half of what the machine has free.
        let avail = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:").and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())))
            .map_or(0, |kb| kb * 1024);
        let bytes = bytes.min(avail / 2);
        let t = std::time::Instant::now();
        const CHUNK: u64 = 256 << 20;
        // Written (not just allocated: untouched pages are never faulted in), all held at once
        // (else one chunk's pages would be reused for the next), then freed together.
        let held: Vec<Vec<u8>> = (0..bytes.div_ceil(CHUNK)).map(|_| vec![1u8; CHUNK as usize]).collect();
        drop(held);
        eprintln!("bench: free page reporting off, {:.1} GiB of memory warmed in {:.1} s", bytes as f64 / (1u64 << 30) as f64, t.elapsed().as_secs_f64());
        Self { saved: Some(saved.trim().to_string()) }
    }

    /// For the results' description.
    pub fn kept(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        if let Some(s) = &self.saved {
            let _ = std::fs::write(PAGE_REPORTING, s);
        }
    }
}
