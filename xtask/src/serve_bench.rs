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
use xtask::components::{cpu_seconds, free_port, pseudo_random, sha256_hex, Agent, Nginx};

use crate::bench::record;

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
    /// Path of the blob under the nginx root, registry storage layout.
    rel: String,
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
    let nginx = Nginx::start(&dir, &root);
    Ok(Setup { _dir: guard, data: Arc::new(data), nginx, rel, agent_bin, dir })
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn client() -> reqwest::Client {
    xtask::components::http_client()
}

/// One whole-body GET with curl (same client for every server): seconds.
fn curl_get(url: &str) -> Result<f64> {
    let out = Command::new("curl").args(["-sS", "-o", "/dev/null", "-w", "%{time_total} %{http_code} %{size_download}", url]).output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let mut f = s.split_whitespace();
    let t: f64 = f.next().context("curl time")?.parse()?;
    if f.next() != Some("200") {
        bail!("curl {url}: {s} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t)
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

pub fn serve(size_mib: u64) -> Result<()> {
    let s = setup(size_mib)?;
    let hex = sha256_hex(&s.data);
    let origin = format!("http://{}", s.nginx.addr);
    let agent_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let agent = Agent::start_on(
        &s.agent_bin,
        agent_addr,
        &s.dir,
        &[format!("bench={origin}")],
        &["--trust-cluster", "--cache-size", &format!("{}MiB", size_mib * 2 + 64)],
    );
    let nginx_url = format!("{origin}/{}", s.rel);
    let agent_url = format!("http://{agent_addr}/v2/bench/blobs/sha256:{hex}?ns=bench");
    let rt = rt()?;
    let c = client();
    // Fill the cache through the agent, then wait for it to commit.
    eprintln!("bench: filling the agent's cache");
    curl_get(&agent_url)?;
    wait_cached(&agent)?;

    let gib = s.data.len() as f64 / (1u64 << 30) as f64;
    let mut rows = Vec::new();
    const RUNS: usize = 5;
    let mut tput: [Vec<f64>; 2] = Default::default();
    let mut cpu: [f64; 2] = [0.0; 2];
    // Interleaved runs, so both servers see the same machine conditions.
    for _ in 0..RUNS {
        for (i, (url, pid)) in [(&nginx_url, s.nginx.proc.pid()), (&agent_url, agent.proc.pid())].iter().enumerate() {
            let c0 = cpu_seconds(*pid);
            let t = curl_get(url)?;
            cpu[i] += cpu_seconds(*pid) - c0;
            tput[i].push(gib / t);
        }
    }
    for t in &mut tput {
        t.sort_by(|a, b| a.total_cmp(b));
    }
    let med = |i: usize| percentile(&tput[i], 0.5);
    let cpu_per_gib = |i: usize| cpu[i] / (gib * RUNS as f64);
    rows.push(format!(
        "Whole blob ({size_mib} MiB) over loopback HTTP, curl to /dev/null, {RUNS} interleaved runs each; server CPU is utime+stime of the serving process.\n\n| server | median GiB/s | min GiB/s | max GiB/s | server CPU s per GiB |\n|---|---|---|---|---|"
    ));
    for (i, name) in ["nginx 1.22 (sendfile on)", "peerd agent (cache hit, sendfile)"].iter().enumerate() {
        rows.push(format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.3} |",
            med(i),
            tput[i][0],
            tput[i][RUNS - 1],
            cpu_per_gib(i)
        ));
    }
    rows.push(format!("\nagent / nginx throughput: **{:.2}x** (median); CPU per GiB ratio {:.2}x.\n", med(1) / med(0), cpu_per_gib(1) / cpu_per_gib(0).max(1e-9)));

    // Random range reads, 4 KiB to 1 MiB, 8 concurrent keep-alive readers.
    rows.push("Random range reads of the same blob, 4 KiB to 1 MiB each, 8 concurrent readers x 500 reads, reqwest keep-alive client.\n\n| server | requests/s | p50 latency | p99 latency | errors |\n|---|---|---|---|---|".into());
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
    rows.push(format!("\nagent / nginx requests per second: **{:.2}x**. {}.", rps[1] / rps[0], machine_load_note()));
    let table = rows.join("\n");
    println!("{table}");
    drop(agent);
    record("Serving a cached blob: agent vs nginx", &table)
}


