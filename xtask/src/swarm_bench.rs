//! `bench swarm`: one blob to N nodes over shaped links, side by side in one run: (a) every node
//! straight from the registry, (b) a BitTorrent swarm (aria2 + opentracker) seeded from the
//! registry's namespace, (c) peerd. Per-node completion p50/max as multiples of the ideal S/B, and
//! origin egress / S. Built on the same netcluster code as the tests and `cargo xtask cluster`.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::{
    components::{busy_between, cpu_seconds, machine_cpu, pseudo_random, run, sha256_hex, Proc},
    netcluster::{Deployment, NetCluster, Spec, MIRROR_PORT, QUEUE_MS},
};

use crate::results::record;

/// The link rate (Mbit/s).
pub const RATE_MBIT: u32 = 200;

/// Every link's rate: the same at every N, or the cluster's total divided by N.
#[derive(Clone, Copy)]
pub enum Rate {
    PerLink(u32),
    Aggregate(u32),
}

/// S/B: seconds `size` bytes take at `rate_mbit`.
fn ideal_secs(size: u64, rate_mbit: u32) -> f64 {
    size as f64 * 8.0 / (rate_mbit as f64 * 1e6)
}

impl Rate {
    fn at(self, n: usize) -> u32 {
        match self {
            Rate::PerLink(r) => r,
            Rate::Aggregate(a) => (a / n as u32).max(1),
        }
    }
}

struct Row {
    n: usize,
    rate: u32,
    what: &'static str,
    p50: f64,
    max: f64,
    egress: f64,
    cpu: f64,
    /// Share of the machine's CPU busy during the run (all processes, kernel included).
    busy: f64,
}

/// Puts the blob straight into the registry's filesystem storage (no slow upload through a
/// shaped link): the blob data and the repository's layer link.
fn seed_registry(dir: &Path, hex: &str, file: &Path) -> Result<()> {
    let root = dir.join("registry-data/docker/registry/v2");
    let data = root.join(format!("blobs/sha256/{}/{hex}/data", &hex[..2]));
    std::fs::create_dir_all(data.parent().context("parent")?)?;
    std::fs::hard_link(file, &data).or_else(|_| std::fs::copy(file, &data).map(|_| ()))?;
    let link = root.join(format!("repositories/bench/_layers/sha256/{hex}/link"));
    std::fs::create_dir_all(link.parent().context("parent")?)?;
    std::fs::write(link, format!("sha256:{hex}"))?;
    Ok(())
}

/// Runs `xtask fetch-sha256 URL` (`fetch_sha256`) in every node at once; returns per-node
/// seconds (fails if any node got wrong bytes). The client reads and hashes in one process with
/// the CPU's SHA extensions: with N nodes reading along with the swarm on 2 cores, every
/// CPU-second the client spends is taken from the agents (`curl | openssl dgst` cost about
/// twice as much: two processes, a pipe, two more copies).
fn fetch_all(c: &NetCluster, url: &str, hex: &str) -> Result<Vec<f64>> {
    let client = release_client()?;
    let start = Instant::now();
    let handles: Vec<_> = c
        .nodes
        .iter()
        .map(|n| {
            let ns = n.ns.clone();
            let (url, client) = (url.to_string(), client.clone());
            std::thread::spawn(move || -> Result<(f64, String)> {
                let t = Instant::now();
                let out = Command::new("ip").args(["netns", "exec", &ns]).arg(&client).args(["fetch-sha256", &url]).output()?;
                if !out.status.success() {
                    bail!("{ns}: {}", String::from_utf8_lossy(&out.stderr));
                }
                Ok((t.elapsed().as_secs_f64(), String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()))
            })
        })
        .collect();
    let mut times = Vec::new();
    for h in handles {
        let (t, sum) = h.join().map_err(|_| anyhow::anyhow!("fetch thread panicked"))??;
        if sum != hex {
            bail!("a node received wrong bytes ({sum})");
        }
        times.push(t);
    }
    let _ = start;
    Ok(times)
}

/// Per-node link counters from the switch side: (node upload, node download) bytes. One `ip`
/// call for all nodes (the switch namespace holds every node's peer interface).
fn link_bytes(switch: &str, sw_ifs: &[String]) -> Vec<(u64, u64)> {
    let out = run(Command::new("ip").args(["-n", switch, "-s", "-o", "link", "show"]));
    sw_ifs
        .iter()
        .map(|sw_if| {
            let line = out.lines().find(|l| l.contains(&format!(" {sw_if}@"))).unwrap_or("");
            // -o: "... RX: bytes packets ... \    <rx bytes> ... TX: ... \    <tx bytes> ..."
            let nums: Vec<u64> = line.split("\\").filter_map(|p| p.split_whitespace().next().and_then(|x| x.parse().ok())).collect();
            // The switch side receives what the node uploads and transmits what it downloads.
            (nums.first().copied().unwrap_or(0), nums.get(1).copied().unwrap_or(0))
        })
        .collect()
}

/// `PEERD_BENCH_TRACE=1`: samples every node's link every 500 ms while `f` runs and prints a
/// timeline (Mbit/s up/down per node) and totals to stderr. Diagnostics only.
fn traced<T>(c: &NetCluster, f: impl FnOnce() -> T) -> T {
    if std::env::var_os("PEERD_BENCH_TRACE").is_none() {
        return f();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, switch, ifs) = (stop.clone(), c.switch.clone(), c.nodes.iter().map(|n| n.sw_if.clone()).collect::<Vec<_>>());
        let nss: Vec<String> = c.nodes.iter().map(|n| n.ns.clone()).collect();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut last = link_bytes(&switch, &ifs);
            let first = last.clone();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let now = link_bytes(&switch, &ifs);
                let cells: Vec<String> = now.iter().zip(&last).map(|(a, b)| format!("{:3.0}/{:3.0}", (a.0 - b.0) as f64 * 16e-6, (a.1 - b.1) as f64 * 16e-6)).collect();
                // Upload queue (bytes in each node's shaped egress qdisc): a full one delays
                // the node's ACKs of what it downloads.
                let queues: Vec<String> = nss
                    .iter()
                    .map(|ns| {
                        let out = run(Command::new("ip").args(["netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", "eth0"]));
                        out.split_whitespace().skip_while(|w| *w != "backlog").nth(1).unwrap_or("?").to_string()
                    })
                    .collect();
                eprintln!("t={:5.1}s up/down Mbit/s: {}  upload queue: {}", t0.elapsed().as_secs_f64(), cells.join(" "), queues.join(" "));
                last = now;
            }
            let tot: Vec<String> = last.iter().zip(&first).map(|(a, b)| format!("{:.2}/{:.2}", (a.0 - b.0) as f64 / 268435456.0, (a.1 - b.1) as f64 / 268435456.0)).collect();
            eprintln!("totals up/down in S: {}", tot.join(" "));
        })
    };
    let r = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    r
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

fn stats(mut t: Vec<f64>, ideal: f64) -> (f64, f64) {
    t.sort_by(|a, b| a.total_cmp(b));
    (t[t.len() / 2] / ideal, t[t.len() - 1] / ideal)
}

/// What a BitTorrent run measured: each node's completion time, and the user+sys seconds of
/// the nodes' aria2 processes (all of them, up to the last node's completion) and of the
/// seeder's (the origin's, in the registry namespace).
struct BtRun {
    times: Vec<f64>,
    nodes_cpu: f64,
    seeder_cpu: f64,
}

/// BitTorrent baseline: opentracker and an aria2 seeder in the registry namespace, aria2
/// leechers in every node (they keep seeding until all are done, as a real swarm would).
fn bittorrent(c: &NetCluster, dir: &Path, file: &Path) -> Result<BtRun> {
    let reg_ip = c.registry.ip;
    let torrent = dir.join("blob.torrent");
    let _ = std::fs::remove_file(&torrent);
    run(Command::new("mktorrent").args(["-l", "20", "-a", &format!("http://{reg_ip}:6969/announce"), "-o"]).arg(&torrent).arg(file));
    let info = run(Command::new("aria2c").arg("-S").arg(&torrent));
    let hash = info.lines().find_map(|l| l.trim().strip_prefix("Info Hash: ")).context("info hash")?.trim().to_string();
    let wl = dir.join("whitelist");
    std::fs::write(&wl, format!("{hash}\n"))?;
    let conf = dir.join("opentracker.conf");
    std::fs::write(&conf, format!("listen.tcp {reg_ip}:6969\nlisten.udp {reg_ip}:6969\naccess.whitelist {}\n", wl.display()))?;
    let mut procs: Vec<Proc> = Vec::new();
    // `ip netns exec` execs the program: each Proc's pid is aria2c's own.
    procs.push(Proc::spawn(Command::new("ip").args(["netns", "exec", &c.registry.ns, "opentracker", "-f"]).arg(&conf), dir.join("tracker.log")));
    std::thread::sleep(Duration::from_millis(300));
    let common = ["--enable-dht=false", "--bt-enable-lpd=false", "--enable-peer-exchange=true", "--seed-ratio=0.0", "--seed-time=100000", "--summary-interval=0", "--console-log-level=warn", "--file-allocation=none", "--bt-max-peers=64", "--check-integrity=false"];
    let seed_dir = file.parent().context("dir")?;
    procs.push(Proc::spawn(
        Command::new("ip").args(["netns", "exec", &c.registry.ns, "aria2c"]).args(common).arg("--bt-seed-unverified=true").arg(format!("--dir={}", seed_dir.display())).arg(&torrent),
        dir.join("seed.log"),
    ));
    let seeder_pid = procs[1].pid();
    let seeder0 = cpu_seconds(seeder_pid);
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let mut done_files = Vec::new();
    let mut node_pids = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let d = dir.join(format!("bt{i}"));
        std::fs::create_dir_all(&d)?;
        let marker = dir.join(format!("bt{i}.done"));
        let _ = std::fs::remove_file(&marker);
        let hook = dir.join(format!("bt{i}.sh"));
        std::fs::write(&hook, format!("#!/bin/sh\ndate +%s.%N > {}\n", marker.display()))?;
        run(Command::new("chmod").arg("+x").arg(&hook));
        procs.push(Proc::spawn(
            Command::new("ip").args(["netns", "exec", &n.ns, "aria2c"]).args(common).arg(format!("--dir={}", d.display())).arg(format!("--on-bt-download-complete={}", hook.display())).arg(&torrent),
            dir.join(format!("bt{i}.log")),
        ));
        node_pids.push(procs[procs.len() - 1].pid());
        done_files.push(marker);
    }
    let mut times = vec![f64::NAN; c.nodes.len()];
    let deadline = Instant::now() + Duration::from_secs(900);
    while times.iter().any(|t| t.is_nan()) {
        for (i, m) in done_files.iter().enumerate() {
            if times[i].is_nan() && m.exists() {
                times[i] = start.elapsed().as_secs_f64();
            }
        }
        if Instant::now() > deadline {
            bail!("BitTorrent swarm did not finish in 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Read while they run (the nodes started at zero).
    let nodes_cpu = cpu_of(&node_pids);
    let seeder_cpu = cpu_seconds(seeder_pid) - seeder0;
    drop(procs);
    Ok(BtRun { times, nodes_cpu, seeder_cpu })
}

pub fn swarm(size_mib: u64, nodes: &[usize], rates: Rate, queue_ms: u32, small_first: bool, with_bt: bool, own_memory: bool) -> Result<()> {
    // Checked before minutes of runs, not when the first BitTorrent run starts.
    if with_bt {
        crate::require_tools(&[("aria2c", "aria2"), ("mktorrent", "mktorrent"), ("opentracker", "opentracker")])?;
    }
    // PEERD_BENCH_BINARY=<path>: run that agent instead of this tree's (A/B runs of two builds
    // under the same machine load; diagnostics).
    let peerd = match std::env::var_os("PEERD_BENCH_BINARY") {
        Some(p) => PathBuf::from(p),
        None => {
            crate::build(true)?;
            crate::target_dir().join("release/peerd")
        }
    };
    let base = PathBuf::from(format!("/var/tmp/peerd-bench-swarm-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let size = size_mib << 20;
    let data = pseudo_random(size, 0x1234_5678_9abc_def1);
    let hex = sha256_hex(&data);
    let file = base.join("blob.bin");
    std::fs::write(&file, &data)?;
    drop(data);
    // Each node's copy from peerd, then from BitTorrent (peerd's stay until the node count's
    // runs end), and the registry's.
    let max_n = nodes.iter().copied().max().unwrap_or(0) as u64;
    let memory = own_memory.then(|| crate::guest::GuestMemory::keep((2 * max_n + 2) * size));
    let mut rows = Vec::new();
    // (N, the BitTorrent seeder's CPU seconds): the origin's side, not in the nodes' column.
    let mut seeders: Vec<(usize, f64)> = Vec::new();
    for &n in nodes {
        let rate = rates.at(n);
        let ideal = ideal_secs(size, rate);
        let prefix = format!("pb{}", std::process::id() % 1000);
        let dir = base.join(format!("n{n}"));
        std::fs::create_dir_all(&dir)?;
        let c = NetCluster::up(Spec { nodes: n, rate_mbit: rate, registry_rate_mbit: rate, delay_ms: 0, queue_ms, small_first, prefix });
        seed_registry(&dir, &hex, &file)?;
        // (a) direct, and (c) peerd, with the same registry process.
        let dep = Deployment::start(&c, &peerd, &dir, &["--trust-cluster"]);
        let reg = dep.registry_addr;
        // PEERD_BENCH_ONLY_PEERD=1 (iterating on peerd): no direct run.
        if std::env::var_os("PEERD_BENCH_ONLY_PEERD").is_none() {
            eprintln!("bench swarm: N={n} direct");
            let (e0, m0) = (c.registry_tx_bytes(), machine_cpu());
            let t = fetch_all(&c, &format!("http://{reg}/v2/bench/blobs/sha256:{hex}"), &hex)?;
            let (p50, max) = stats(t, ideal);
            let busy = busy_between(m0, machine_cpu());
            rows.push(Row { n, rate, what: "direct from the registry", p50, max, egress: (c.registry_tx_bytes() - e0) as f64 / size as f64, cpu: f64::NAN, busy });
        }
        eprintln!("bench swarm: N={n} peerd");
        let pids: Vec<u32> = dep.agents.iter().flatten().map(|p| p.pid()).collect();
        let (e0, c0, m0) = (c.registry_tx_bytes(), cpu_of(&pids), machine_cpu());
        // PEERD_BENCH_PERF=<file>: a system-wide perf profile of the peerd run (diagnostics).
        let perf = std::env::var_os("PEERD_BENCH_PERF").map(|out| {
            Proc::spawn(Command::new("perf").args(["record", "-F", "499", "-a", "-g", "-o"]).arg(out), base.join(format!("perf-n{n}.log")))
        });
        let t = traced(&c, || fetch_all(&c, &format!("http://127.0.0.1:{MIRROR_PORT}/v2/bench/blobs/sha256:{hex}?ns={reg}"), &hex))?;
        let busy = busy_between(m0, machine_cpu());
        if let Some(p) = perf {
            let _ = Command::new("kill").args(["-INT", &p.pid().to_string()]).status();
            let stat = format!("/proc/{}/stat", p.pid());
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
                std::thread::sleep(Duration::from_millis(200));
            }
            drop(p);
        }
        if std::env::var_os("PEERD_BENCH_TRACE").is_some() {
            let per: Vec<String> = t.iter().zip(&pids).map(|(t, p)| format!("{:.2}x/{:.1}cpu", t / ideal, cpu_seconds(*p))).collect();
            eprintln!("peerd per node (time/S/B, agent CPU s): {}", per.join(" "));
            // UDP datagrams the kernel dropped for full socket buffers, per node.
            let drops: Vec<String> = c
                .nodes
                .iter()
                .map(|n| {
                    let snmp = run(Command::new("ip").args(["netns", "exec", &n.ns, "cat", "/proc/net/snmp"]));
                    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
                    let (h, v) = (udp.first().copied().unwrap_or(""), udp.get(1).copied().unwrap_or(""));
                    h.split_whitespace().zip(v.split_whitespace()).find(|(k, _)| *k == "RcvbufErrors").map_or("?".into(), |(_, v)| v.to_string())
                })
                .collect();
            eprintln!("UDP RcvbufErrors per node: {}", drops.join(" "));
            let keep = base.join(format!("logs-n{n}"));
            let _ = std::fs::create_dir_all(&keep);
            for i in 0..n {
                let _ = std::fs::copy(dir.join(format!("agent{i}.log")), keep.join(format!("agent{i}.log")));
            }
            let _ = std::fs::copy(dir.join("registry.log"), keep.join("registry.log"));
        }
        let (p50, max) = stats(t, ideal);
        rows.push(Row { n, rate, what: "peerd", p50, max, egress: (c.registry_tx_bytes() - e0) as f64 / size as f64, cpu: cpu_of(&pids) - c0, busy });
        drop(dep);
        if with_bt {
            eprintln!("bench swarm: N={n} BitTorrent");
            let (e0, m0) = (c.registry_tx_bytes(), machine_cpu());
            let bt = bittorrent(&c, &dir, &file)?;
            let busy = busy_between(m0, machine_cpu());
            let (p50, max) = stats(bt.times, ideal);
            eprintln!("bench swarm: N={n} BitTorrent: nodes' aria2 CPU {:.1} s, seeder's {:.1} s (load {})", bt.nodes_cpu, bt.seeder_cpu, load());
            seeders.push((n, bt.seeder_cpu));
            rows.push(Row { n, rate, what: "BitTorrent (aria2 + opentracker)", p50, max, egress: (c.registry_tx_bytes() - e0) as f64 / size as f64, cpu: bt.nodes_cpu, busy });
        }
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if std::env::var_os("PEERD_BENCH_TRACE").is_some() {
        eprintln!("logs kept in {}", base.display());
        let _ = std::fs::remove_file(&file);
    } else {
        let _ = std::fs::remove_dir_all(&base);
    }
    let shaping = if small_first { "tc htb, packets under 128 bytes before the FIFO of bulk data" } else { "tc tbf, one FIFO" };
    let links = match rates {
        Rate::PerLink(r) => format!("every link {r} Mbit/s both ways"),
        Rate::Aggregate(a) => format!("every link {a}/N Mbit/s both ways (the cluster's total the same at every N)"),
    };
    let page_reporting = if memory.as_ref().is_some_and(|m| m.kept()) {
        "The VM's free page reporting was off and memory warmed first (`GuestMemory`: page cache writes reuse memory the guest owns instead of faulting it in from the host at ~2 s/GiB)"
    } else {
        "The VM's free page reporting was on (page cache writes fault memory in from the host at ~2 s/GiB)"
    };
    let mut out = vec![format!(
        "One {size_mib} MiB blob to N nodes, {links} ({shaping}, queue of {queue_ms} ms), registry uplink at the nodes' rate, no added latency (no netem on this kernel). {page_reporting}. Times are per-node completion as multiples of the ideal S/B at that rate; egress is bytes the registry's link sent / S. Nodes' CPU is the user+sys seconds of the N nodes' peerd agents, or of their aria2 processes (read when the last node finished; the aria2 seeder in the origin's namespace is listed below the table, as the registry is not counted for peerd), also per GiB delivered to the N nodes; neither includes the client reading the blob from peerd (aria2 writes its file itself). Machine busy is the share of both cores busy during the run, every process and the kernel's packet work included (near 100%, the CPU rather than the links bounds the result). Load average at the end: {}.\n\n| N | link Mbit/s | S/B s | method | p50 / (S/B) | max / (S/B) | origin egress / S | nodes' CPU s | nodes' CPU s per GiB delivered | machine busy |\n|---|---|---|---|---|---|---|---|---|---|",
        load()
    )];
    for r in &rows {
        let cpu = if r.cpu.is_nan() { "-".to_string() } else { format!("{:.1}", r.cpu) };
        let per_gib = if r.cpu.is_nan() { "-".to_string() } else { format!("{:.2}", r.cpu / (r.n as f64 * size as f64 / (1u64 << 30) as f64)) };
        let ideal = ideal_secs(size, r.rate);
        out.push(format!("| {} | {} | {ideal:.1} | {} | {:.2}x | {:.2}x | {:.2}x | {cpu} | {per_gib} | {:.0}% |", r.n, r.rate, r.what, r.p50, r.max, r.egress, r.busy * 100.0));
    }
    if !seeders.is_empty() {
        let s: Vec<String> = seeders.iter().map(|(n, c)| format!("N={n} {c:.1} s")).collect();
        out.push(format!("\nThe aria2 seeder's CPU (origin namespace): {}.", s.join(", ")));
    }
    let table = out.join("\n");
    println!("{table}");
    // The default (deep) queues and others are separate sections: both stay in the file.
    let mut title = if queue_ms == QUEUE_MS { "Swarm: one blob to N nodes".to_string() } else { format!("Swarm: one blob to N nodes, {queue_ms} ms link queues") };
    if small_first {
        title.push_str(", small packets first");
    }
    match rates {
        Rate::PerLink(RATE_MBIT) => {}
        Rate::PerLink(r) => title.push_str(&format!(", {r} Mbit/s links")),
        Rate::Aggregate(a) => title.push_str(&format!(", {a} Mbit/s shared by the N links")),
    }
    record(&title, &table)
}

/// This tool built with optimizations, for `fetch_sha256` (`cargo xtask` is a debug build:
/// its sha256 alone would cost seconds per node).
fn release_client() -> Result<PathBuf> {
    crate::status(Command::new("cargo").current_dir(crate::root()).args(["build", "--quiet", "--release", "-p", "xtask"]))?;
    Ok(crate::target_dir().join("release/xtask"))
}

/// The benchmark client (`cargo xtask fetch-sha256 URL`): prints the sha256 of the body.
pub fn fetch_sha256(url: &str) -> Result<()> {
    use sha2::Digest as _;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let hex = rt.block_on(async {
        let mut r = xtask::components::http_client().get(url).timeout(Duration::from_secs(900)).send().await?.error_for_status()?;
        let mut h = sha2::Sha256::new();
        while let Some(c) = r.chunk().await? {
            h.update(&c);
        }
        anyhow::Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>())
    })?;
    println!("{hex}");
    Ok(())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
