//! `bench serve` and `bench range`: the agent against nginx and against the origin, side by side in
//! one run, with the same client.
use std::{
    io::Write,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::components::{children_cpu, cpu_seconds, free_port, pseudo_random, sha256_hex, Agent, Nginx};

use crate::results::record;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

struct Setup {
    _dir: tempfile_dir::Dir,
    data: Arc<Vec<u8>>,
    nginx: Nginx,
    agent_bin: PathBuf,
    dir: PathBuf,
}

mod tempfile_dir {
    /// A directory removed on drop (benchmarks create GiB-sized files).
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn setup(size_mib: u64) -> Result<Setup> {
    crate::build(true)?;
    let agent_bin = crate::target_dir().join("release/peerd");
    let dir = std::env::temp_dir().join(format!("peerd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guard = tempfile_dir::Dir(dir.clone());
    eprintln!("bench: writing a {size_mib} MiB blob");
    let data = pseudo_random(size_mib << 20, 0x9E37_79B9_7F4A_7C15);
    let hex = sha256_hex(&data);
    let root = dir.join("www");
    let rel = format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]);
    std::fs::create_dir_all(root.join(&rel).parent().context("parent")?)?;
    std::fs::File::create(root.join(&rel))?.write_all(&data)?;
    // The OCI path too, for the agent's registry route (nginx serves the same file).
    let oci = root.join(format!("v2/bench/blobs/sha256:{hex}"));
    std::fs::create_dir_all(oci.parent().context("parent")?)?;
    std::fs::hard_link(root.join(&rel), &oci)?;
    let nginx = Nginx::start_with(&dir, &root, "tcp_nopush on;");
    Ok(Setup { _dir: guard, data: Arc::new(data), nginx, agent_bin, dir })
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn client() -> reqwest::Client {
    xtask::components::http_client()
}

/// One whole-body GET with curl (same client for every server), extra headers `headers`:
/// (seconds, curl's own CPU seconds).
fn curl_get(url: &str, headers: &[&str]) -> Result<(f64, f64)> {
    let before = children_cpu();
    let mut cmd = if REALTIME.load(std::sync::atomic::Ordering::Relaxed) {
        let mut c = Command::new("chrt");
        c.args(["-f", "50", "taskset", "-c", "1", "curl"]);
        c
    } else {
        Command::new("curl")
    };
    cmd.args(["-sS", "-o", "/dev/null", "-w", "%{time_total} %{http_code} %{size_download}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output()?;
    let client_cpu = children_cpu() - before;
    let s = String::from_utf8_lossy(&out.stdout);
    let mut f = s.split_whitespace();
    let t: f64 = f.next().context("curl time")?.parse()?;
    if f.next() != Some("200") {
        bail!("curl {url}: {s} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((t, client_cpu))
}

/// `--realtime`: curl on core 1, the servers on core 0, all SCHED_FIFO.
static REALTIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Pins every thread of `pid` to core 0 at SCHED_FIFO 50.
fn realtime_server(pid: u32) -> Result<()> {
    let p = pid.to_string();
    crate::status(Command::new("taskset").args(["-a", "-p", "-c", "0", &p]).stdout(std::process::Stdio::null()))?;
    crate::status(Command::new("chrt").args(["-a", "-f", "-p", "50", &p]))
}


/// Random range reads: (latencies in seconds, bytes per read, errors).
async fn random_reads(
    client: &reqwest::Client,
    url: &str,
    data: &Arc<Vec<u8>>,
    readers: usize,
    per_reader: usize,
    min: u64,
    max: u64,
) -> (Vec<(f64, u64)>, usize) {
    let size = data.len() as u64;
    let mut tasks = Vec::new();
    for r in 0..readers {
        let client = client.clone();
        let url = url.to_string();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ (r as u64 + 1).wrapping_mul(0x9E37_79B9);
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut out = Vec::with_capacity(per_reader);
            let mut errors = 0;
            for _ in 0..per_reader {
                let len = min + next() % (max - min + 1);
                let start = next() % (size - len);
                let t = Instant::now();
                let res = client.get(&url).header("Range", format!("bytes={start}-{}", start + len - 1)).send().await;
                let ok = match res {
                    Ok(r) if r.status().as_u16() == 206 => match r.bytes().await {
                        Ok(b) => b[..] == data[start as usize..(start + len) as usize],
                        Err(_) => false,
                    },
                    _ => false,
                };
                if ok {
                    out.push((t.elapsed().as_secs_f64(), len));
                } else {
                    errors += 1;
                }
            }
            (out, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((o, e)) = t.await {
            all.extend(o);
            errors += e;
        }
    }
    (all, errors)
}

fn machine_load_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!("load average at the end: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Waits until the agent logs that it verified and committed the blob.
fn wait_cached(agent: &Agent) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let log = agent.proc.log_text();
        if log.contains("prefetched") || log.contains("cached from") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent never cached the blob: {log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One way of fetching the blob in `bench serve`.
struct Case {
    name: &'static str,
    url: String,
    headers: Vec<&'static str>,
    pid: u32,
}

pub fn serve(sizes_mib: &[u64], runs: usize, realtime: bool) -> Result<()> {
    let runs = runs.max(1);
    REALTIME.store(realtime, std::sync::atomic::Ordering::Relaxed);
    let conditions = if realtime {
        "`--realtime`: each server on core 0 and curl on core 1, all SCHED_FIFO, so the other builds sharing this machine do not decide the figures (an idle 2-core machine, as the outside measurement had)"
    } else {
        "no pinning: the 2 cores were shared with other builds, so throughput is noisy; CPU per GiB less so"
    };
    let mut tables = Vec::new();
    let mut summary = Vec::new();
    for (k, &size_mib) in sizes_mib.iter().enumerate() {
        let (table, line) = serve_size(size_mib, runs, k + 1 == sizes_mib.len())?;
        tables.push(table);
        summary.push(line);
    }
    let table = format!(
        "curl to /dev/null against nginx 1.22 (`sendfile on; tcp_nopush on`, as the outside measurement of issue 27) and against the agent (cache hit, sendfile; default flags: each request's access check is a HEAD to the registry, cached 60 s), the blob in the page cache, over loopback. Runs alternate between the three cases so each sees the same machine; {runs} runs each. Server CPU is the serving process's utime+stime (`/proc/<pid>/stat`) over the run, client CPU curl's (getrusage); over loopback the receive path runs in whichever process triggers a transmission, so the two shift between server and client and their sum is the machine's cost. Conditions: {conditions}.\n\n{}\n\nSummary (median throughput ratio to nginx, server CPU per GiB ratio to nginx): {}.",
        tables.join("\n\n"),
        summary.join("; ")
    );
    println!("{table}");
    record("Serving a cached blob: agent vs nginx", &table)
}

fn serve_size(size_mib: u64, runs: usize, with_ranges: bool) -> Result<(String, String)> {
    let s = setup(size_mib)?;
    let hex = sha256_hex(&s.data);
    let origin = format!("http://{}", s.nginx.addr);
    let agent_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let agent = Agent::start_on(
        &s.agent_bin,
        agent_addr,
        &s.dir,
        &[format!("bench={origin}")],
        &["--cache-size", &format!("{}MiB", size_mib * 2 + 64)],
    );
    let nginx_url = format!("{origin}/v2/bench/blobs/sha256:{hex}");
    let agent_url = format!("http://{agent_addr}/v2/bench/blobs/sha256:{hex}?ns=bench");
    let agent_host_url = format!("http://{agent_addr}/v2/bench/blobs/sha256:{hex}");
    // Fill the cache through the agent, then wait for it to commit.
    eprintln!("bench: filling the agent's cache");
    curl_get(&agent_url, &[])?;
    wait_cached(&agent)?;
    let cases = [
        Case { name: "nginx 1.22 (sendfile on, tcp_nopush on)", url: nginx_url.clone(), headers: vec![], pid: s.nginx.proc.pid() },
        Case { name: "agent, `/v2/...?ns=bench`", url: agent_url.clone(), headers: vec![], pid: agent.proc.pid() },
        Case { name: "agent, `/v2/...` with `Host: bench`", url: agent_host_url, headers: vec!["Host: bench"], pid: agent.proc.pid() },
    ];
    if REALTIME.load(std::sync::atomic::Ordering::Relaxed) {
        realtime_server(s.nginx.proc.pid())?;
        realtime_server(agent.proc.pid())?;
    }
    // One untimed GET each: page cache, access check, TCP paths warm.
    for c in &cases {
        curl_get(&c.url, &c.headers)?;
    }
    let gib = s.data.len() as f64 / (1u64 << 30) as f64;
    let mut tput: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut server_cpu = vec![0.0f64; cases.len()];
    let mut client_cpu = vec![0.0f64; cases.len()];
    // Alternating runs, so every case sees the same machine conditions.
    for r in 0..runs {
        for (i, c) in cases.iter().enumerate() {
            let c0 = cpu_seconds(c.pid);
            let (t, cc) = curl_get(&c.url, &c.headers)?;
            server_cpu[i] += cpu_seconds(c.pid) - c0;
            client_cpu[i] += cc;
            tput[i].push(gib / t);
            eprintln!("bench: {size_mib} MiB run {r}: {} {:.2} GiB/s", c.name, gib / t);
        }
    }
    for t in &mut tput {
        t.sort_by(|a, b| a.total_cmp(b));
    }
    let med = |i: usize| percentile(&tput[i], 0.5);
    let per_gib = |v: f64| v / (gib * runs as f64);
    let mut rows = vec![format!(
        "Whole blob, {size_mib} MiB:\n\n| server | median GiB/s | min GiB/s | max GiB/s | x nginx (median) | server CPU s per GiB | x nginx | client CPU s per GiB |\n|---|---|---|---|---|---|---|---|"
    )];
    for (i, c) in cases.iter().enumerate() {
        rows.push(format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.3} | {:.2}x | {:.3} |",
            c.name,
            med(i),
            tput[i][0],
            tput[i][runs - 1],
            med(i) / med(0),
            per_gib(server_cpu[i]),
            server_cpu[i] / server_cpu[0].max(1e-9),
            per_gib(client_cpu[i])
        ));
    }
    let line = format!(
        "{size_mib} MiB: ns= {:.2}x / {:.2}x CPU, Host {:.2}x / {:.2}x CPU",
        med(1) / med(0),
        server_cpu[1] / server_cpu[0].max(1e-9),
        med(2) / med(0),
        server_cpu[2] / server_cpu[0].max(1e-9)
    );
    if with_ranges {
        // Random range reads, 4 KiB to 1 MiB, 8 concurrent keep-alive readers.
        let rt = rt()?;
        let c = client();
        rows.push("\nRandom range reads of the same blob, 4 KiB to 1 MiB each, 8 concurrent readers x 500 reads, reqwest keep-alive client.\n\n| server | requests/s | p50 latency | p99 latency | errors |\n|---|---|---|---|---|".into());
        let mut rps = [0.0f64; 2];
        for (i, (name, url)) in [("nginx", &nginx_url), ("peerd agent", &agent_url)].iter().enumerate() {
            let t = Instant::now();
            let (res, errors) = rt.block_on(random_reads(&c, url, &s.data, 8, 500, 4 << 10, 1 << 20));
            let el = t.elapsed().as_secs_f64();
            let mut lat: Vec<f64> = res.iter().map(|r| r.0).collect();
            lat.sort_by(|a, b| a.total_cmp(b));
            rps[i] = res.len() as f64 / el;
            rows.push(format!(
                "| {name} | {:.0} | {:.2} ms | {:.2} ms | {errors} |",
                rps[i],
                percentile(&lat, 0.5) * 1e3,
                percentile(&lat, 0.99) * 1e3
            ));
        }
        rows.push(format!("\nagent / nginx requests per second: **{:.2}x**.", rps[1] / rps[0]));
    }
    rows.push(format!("\n{}.", machine_load_note()));
    drop(agent);
    Ok((rows.join("\n"), line))
}


