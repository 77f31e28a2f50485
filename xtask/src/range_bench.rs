//! `bench range`: lazy-loading reads (Azure peerd's headline case) on the cluster harness. Blob
//! storage (nginx, registry storage layout) sits behind a slow link, nodes on fast ones; one node
//! holds a blob, another reads random ranges of it. Side by side in one run: (a) straight from
//! storage, (b) through peerd with another node holding the blob, (c) through peerd with nobody
//! holding it (cold), (d) through peerd with the blob cached on the reading node (warm); the
//! random workload (readers x ranges of 4 KiB-1 MiB) and a sequential streaming read (1 MiB
//! ranges in order). Per-read throughput percentiles, time to first byte, storage egress.
use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::{
    components::{pseudo_random, sha256_hex, Proc},
    netcluster::{Deployment, NetCluster, Options, Spec, QUEUE_MS},
};

use crate::results::record;

const STORAGE_PORT: u16 = 8080;

pub struct Args {
    pub size_mib: u64,
    pub readers: usize,
    pub per_reader: usize,
    pub storage_mbit: u32,
    pub node_mbit: u32,
}

/// One scenario's client results.
#[derive(serde::Deserialize, Default)]
struct Reads {
    /// (seconds, bytes, seconds to first byte) per successful read.
    reads: Vec<(f64, u64, f64)>,
    errors: usize,
    elapsed: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// nginx in the storage namespace, logging each request with the bytes it sent.
fn storage(ns: &str, addr: SocketAddr, dir: &Path, root: &Path) -> Result<(Proc, PathBuf)> {
    let prefix = dir.join("storage");
    std::fs::create_dir_all(prefix.join("tmp"))?;
    let log = prefix.join("access.log");
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  log_format bytes '$request_method $status $body_bytes_sent';\n  access_log {log} bytes;\n  client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp; uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;\n  sendfile on;\n  keepalive_requests 100000;\n  default_type application/octet-stream;\n  server {{ listen {addr}; root {root}; }}\n}}\n",
            p = prefix.display(),
            log = log.display(),
            root = root.display()
        ),
    )?;
    let proc = Proc::spawn(Command::new("ip").args(["netns", "exec", ns, "nginx", "-c"]).arg(&conf).arg("-p").arg(&prefix), prefix.join("stderr.log"));
    for _ in 0..100 {
        let ok = Command::new("ip").args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null", &format!("http://{addr}/")]).status().map(|s| s.success()).unwrap_or(false);
        if ok {
            return Ok((proc, log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("storage nginx did not start: {}", proc.log_text())
}

/// Bytes storage has sent so far (GET bodies; the agents' access-check HEADs carry none).
fn egress(log: &Path) -> u64 {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()).sum()
}

fn curl_in(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns, "curl", "-s", "--max-time", "120"]).args(args).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Whether node `ns`'s agent holds `digest` complete.
fn complete_on(ns: &str, digest: &str) -> bool {
    let v: serde_json::Value = serde_json::from_str(&curl_in(ns, &["http://127.0.0.1:30000/cache"])).unwrap_or_default();
    v.as_array().is_some_and(|a| a.iter().any(|b| b["digest"] == digest && b["complete"] == true))
}

/// Removes `digest` from node `ns`'s cache and waits until it is gone (a copy still being
/// written, e.g. as the blob's owner for another node, cannot be removed until it completes).
fn ensure_absent(ns: &str, digest: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let v: serde_json::Value = serde_json::from_str(&curl_in(ns, &["http://127.0.0.1:30000/cache"])).unwrap_or_default();
        if !v.as_array().is_some_and(|a| a.iter().any(|b| b["digest"] == digest)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{digest} still cached on {ns} after {within:?}");
        }
        curl_in(ns, &["-X", "DELETE", &format!("http://127.0.0.1:30000/cache/{digest}")]);
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A counter of node `ns`'s agent.
fn metric(ns: &str, name: &str) -> u64 {
    curl_in(ns, &["http://127.0.0.1:30000/metrics"]).lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).unwrap_or(0.0) as u64
}

fn wait_complete(ns: &str, digest: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while !complete_on(ns, digest) {
        if Instant::now() > deadline {
            bail!("{digest} not complete on {ns} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Runs the benchmark client in `ns`.
fn client(ns: &str, url: &str, file: &Path, mode: &str, a: &Args) -> Result<Reads> {
    let exe = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(["range-client", "--url", url, "--mode", mode, "--readers", &a.readers.to_string(), "--per-reader", &a.per_reader.to_string(), "--file"])
        .arg(file)
        .output()?;
    if !out.status.success() {
        bail!("range client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("range client output")
}

pub fn run(a: Args) -> Result<()> {
    crate::build(true)?;
    let agent_bin = crate::target_dir().join("release/peerd");
    let dir = std::env::temp_dir().join(format!("peerd-bench-range-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let root = dir.join("www");
    // Three blobs: cold (nobody holds it), peer (node 0 holds it), sequential-from-peer.
    let mut blobs = Vec::new();
    for (i, seed) in [0x51u64, 0x52, 0x53].into_iter().enumerate() {
        eprintln!("bench range: writing blob {i} ({} MiB)", a.size_mib);
        let data = pseudo_random(a.size_mib << 20, seed);
        let hex = sha256_hex(&data);
        let rel = format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]);
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::File::create(&path)?.write_all(&data)?;
        blobs.push((format!("sha256:{hex}"), rel, path));
    }
    let c = NetCluster::up(Spec { nodes: 2, rate_mbit: a.node_mbit, registry_rate_mbit: a.storage_mbit, delay_ms: 0, queue_ms: QUEUE_MS, small_first: false, prefix: format!("prb{}", std::process::id() % 1000) });
    let st_addr = SocketAddr::new(c.registry.ip.into(), STORAGE_PORT);
    let (_nginx, log) = storage(&c.registry.ns, st_addr, &dir, &root)?;
    // The flags a user passes: the peers, the secret (the harness's), the storage host.
    let _d = Deployment::start_opts(&c, &agent_bin, &dir, &["--blob-host", &st_addr.to_string()], Options::default());
    let (n0, n1) = (c.nodes[0].ns.clone(), c.nodes[1].ns.clone());
    let direct = |rel: &str| format!("http://{st_addr}/{rel}");
    let via = |rel: &str| format!("http://127.0.0.1:30000/blobs/http://{st_addr}/{rel}");

    let mut rows: Vec<(String, &'static str, Reads, u64)> = Vec::new();
    let mut measure = |name: &str, ns: &str, url: String, file: &Path, mode: &'static str| -> Result<()> {
        eprintln!("bench range: {name}, {mode}");
        let before = egress(&log);
        let r = client(ns, &url, file, mode, &a)?;
        std::thread::sleep(Duration::from_millis(300));
        rows.push((name.to_string(), mode, r, egress(&log) - before));
        Ok(())
    };
    let (cold, peer, seq) = (&blobs[0], &blobs[1], &blobs[2]);
    // (a) straight from storage.
    measure("(a) direct from storage", &n1, direct(&peer.1), &peer.2, "random")?;
    measure("(a) direct from storage", &n1, direct(&seq.1), &seq.2, "seq")?;
    // (c) nobody holds it: ranges relayed, the blob fetched in the background.
    measure("(c) peerd, cold", &n1, via(&cold.1), &cold.2, "random")?;
    // (b) node 0 holds it (read whole through its proxy), node 1 does not.
    for b in [peer, seq] {
        curl_in(&n0, &["-o", "/dev/null", &via(&b.1)]);
        wait_complete(&n0, &b.0, Duration::from_secs(300))?;
        // Node 1 may have fetched it as the blob's owner for node 0: that copy goes.
        ensure_absent(&n1, &b.0, Duration::from_secs(300))?;
    }
    measure("(b) peerd, another node holds it", &n1, via(&peer.1), &peer.2, "random")?;
    measure("(b) peerd, another node holds it", &n1, via(&seq.1), &seq.2, "seq")?;
    // (d) warm: the background prefetch completed the blob on node 1.
    wait_complete(&n1, &peer.0, Duration::from_secs(300))?;
    measure("(d) peerd, warm local cache", &n1, via(&peer.1), &peer.2, "random")?;

    let (from_peers, fallbacks) = (metric(&n1, "peerd_ranges_from_peers_total"), metric(&n1, "peerd_range_peer_fallbacks_total"));
    let mut table = vec![format!(
        "{} MiB blobs in registry storage layout on nginx behind a {} Mbit/s link; 2 nodes on {} Mbit/s links (network namespaces, tbf, no added latency); agents started with `--peer` x2, the cluster secret, `--blob-host`. Random: {} readers x {} ranges of 4 KiB-1 MiB; sequential: one reader, 1 MiB ranges in order, the whole blob. Throughput is per read (bytes / latency), TTFB is time to the first body byte; storage egress is the bytes nginx sent during the row (the background prefetch included). Every byte checked against the blob.\n\n| path | workload | p50 MB/s | p90 | p99 | TTFB p50 ms | TTFB p99 ms | reads | errors | wall s | storage egress MiB |\n|---|---|---|---|---|---|---|---|---|---|---|",
        a.size_mib, a.storage_mbit, a.node_mbit, a.readers, a.per_reader
    )];
    let mut p50 = std::collections::HashMap::new();
    for (name, mode, r, eg) in &rows {
        let workload = if *mode == "seq" { "sequential" } else { "random" };
        let mut mbps: Vec<f64> = r.reads.iter().map(|(t, n, _)| *n as f64 / 1e6 / t).collect();
        let mut ttfb: Vec<f64> = r.reads.iter().map(|(_, _, f)| f * 1000.0).collect();
        let (m50, m90, m99) = (pct(&mut mbps, 0.5), pct(&mut mbps, 0.9), pct(&mut mbps, 0.99));
        p50.insert(format!("{name}/{workload}"), m50);
        table.push(format!(
            "| {name} | {workload} | {m50:.1} | {m90:.1} | {m99:.1} | {:.1} | {:.1} | {} | {} | {:.1} | {:.1} |",
            pct(&mut ttfb, 0.5),
            pct(&mut ttfb, 0.99),
            r.reads.len(),
            r.errors,
            r.elapsed,
            *eg as f64 / (1 << 20) as f64
        ));
    }
    let ratio = |x: &str, w: &str| p50.get(&format!("{x}/{w}")).copied().unwrap_or(f64::NAN) / p50.get(&format!("(a) direct from storage/{w}")).copied().unwrap_or(f64::NAN);
    table.push(format!(
        "\np50 per-read throughput vs direct, random: (b) peer **{:.2}x**, (c) cold **{:.2}x**, (d) warm **{:.2}x**; sequential: (b) peer **{:.2}x**. Goals: (b) >= 3x, (c) >= 1.0x, (b)'s storage egress ~0.",
        ratio("(b) peerd, another node holds it", "random"),
        ratio("(c) peerd, cold", "random"),
        ratio("(d) peerd, warm local cache", "random"),
        ratio("(b) peerd, another node holds it", "sequential"),
    ));
    table.push(format!("Node 1 over the run: {from_peers} ranges answered from the peer, {fallbacks} that tried the peer and were relayed from storage."));
    let table = table.join("\n");
    println!("{table}");
    record("Lazy-loading range reads on the cluster harness (bench range)", &table)
}

/// The benchmark client (`xtask range-client`), run inside a node's namespace: random or
/// sequential range reads of `url`, each checked against `file`; prints `Reads` as JSON.
pub fn client_main(url: &str, file: &Path, mode: &str, readers: usize, per_reader: usize) -> Result<()> {
    let data = std::sync::Arc::new(std::fs::read(file)?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let (reads, errors) = rt.block_on(async {
        let size = data.len() as u64;
        let plan: Vec<Vec<(u64, u64)>> = if mode == "seq" {
            vec![(0..size.div_ceil(1 << 20)).map(|i| (i << 20, (1u64 << 20).min(size - (i << 20)))).collect()]
        } else {
            (0..readers)
                .map(|r| {
                    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ (r as u64 + 1).wrapping_mul(0x9E37_79B9);
                    (0..per_reader)
                        .map(|_| {
                            let mut next = || {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                x
                            };
                            let len = (4 << 10) + next() % ((1 << 20) - (4 << 10) + 1);
                            (next() % (size - len), len)
                        })
                        .collect()
                })
                .collect()
        };
        let mut tasks = Vec::new();
        for ranges in plan {
            let (client, url, data) = (client.clone(), url.to_string(), data.clone());
            tasks.push(tokio::spawn(async move {
                let (mut out, mut errors) = (Vec::new(), 0usize);
                for (start, len) in ranges {
                    let t = Instant::now();
                    let mut ttfb = None;
                    let mut body = Vec::with_capacity(len as usize);
                    let ok = match client.get(&url).header("Range", format!("bytes={start}-{}", start + len - 1)).send().await {
                        Ok(mut r) if r.status().as_u16() == 206 => loop {
                            match r.chunk().await {
                                Ok(Some(c)) => {
                                    ttfb.get_or_insert(t.elapsed().as_secs_f64());
                                    body.extend_from_slice(&c);
                                }
                                Ok(None) => break body[..] == data[start as usize..(start + len) as usize],
                                Err(_) => break false,
                            }
                        },
                        _ => false,
                    };
                    if ok {
                        out.push((t.elapsed().as_secs_f64(), len, ttfb.unwrap_or(0.0)));
                    } else {
                        errors += 1;
                    }
                }
                (out, errors)
            }));
        }
        let (mut all, mut errors) = (Vec::new(), 0);
        for t in tasks {
            if let Ok((o, e)) = t.await {
                all.extend(o);
                errors += e;
            }
        }
        (all, errors)
    });
    let out = serde_json::json!({ "reads": reads, "errors": errors, "elapsed": started.elapsed().as_secs_f64() });
    println!("{out}");
    Ok(())
}
