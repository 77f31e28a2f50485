//! `bench transport`: the CPU one blob costs to move between two nodes, side by side in one run,
//! on an unshaped veth pair between two network namespaces (addresses from 198.18.0.0/15, only
//! inside the namespaces this creates; removed on drop):
//! (a) agent to agent over the peer protocol: node A's agent holds the blob, node B's client
//!     fetches it through B's mirror (B downloads it from A over QUIC, verifies, stores it and
//!     streams it to the client);
//! (b) TLS 1.3 over kernel TCP: nginx HTTPS on A, curl on B (userspace TLS on both sides, no kTLS);
//! (c) plain HTTP with sendfile: nginx on A, curl on B (the floor).
//! Runs alternate (a), (b), (c) so each sees the same machine. CPU is each process's utime+stime
//! (`/proc/<pid>/stat` for servers and agents, getrusage for curl).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::components::{children_cpu, cpu_seconds, pseudo_random, sha256_hex, Proc, TestCa};

use crate::bench::record;

const NS_A: &str = "pd27a";
const NS_B: &str = "pd27b";
const IP_A: &str = "198.19.27.1";
const IP_B: &str = "198.19.27.2";
const HTTP_PORT: u16 = 8080;
const HTTPS_PORT: u16 = 8443;
const PEER_PORT: u16 = 30002;
const MIRROR: &str = "127.0.0.1:30000";

/// Two namespaces joined by a veth pair, no shaping; removed on drop.
struct Pair;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Pair {
    fn up() -> Result<Self> {
        Self::remove();
        let pair = Pair;
        ip(&["netns", "add", NS_A])?;
        ip(&["netns", "add", NS_B])?;
        ip(&["link", "add", "pd27va", "netns", NS_A, "type", "veth", "peer", "name", "pd27vb", "netns", NS_B])?;
        for (ns, dev, addr) in [(NS_A, "pd27va", IP_A), (NS_B, "pd27vb", IP_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    fn remove() {
        for ns in [NS_A, NS_B] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        Self::remove();
    }
}

fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}


/// curl in `ns` to /dev/null: (seconds, curl's CPU seconds, bytes).
fn curl(ns: &str, url: &str, extra: &[&str]) -> Result<(f64, f64, u64)> {
    let before = children_cpu();
    let out = in_ns(ns, "curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "300", "-w", "%{time_total} %{http_code} %{size_download}"])
        .args(extra)
        .arg(url)
        .output()
        .context("run curl")?;
    let cpu = children_cpu() - before;
    let s = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = s.split_whitespace().collect();
    if f.get(1) != Some(&"200") {
        bail!("curl {url}: {s} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((f[0].parse()?, cpu, f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0)))
}

/// Polls `url` from inside `ns` until it answers 2xx, at most `within`.
fn wait_up(ns: &str, url: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let ok = in_ns(ns, "curl").args(["-s", "-o", "/dev/null", "--max-time", "1", url]).status().map(|s| s.success()).unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} in {ns} did not answer within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nginx(dir: &Path, root: &Path, cert: &Path, key: &Path) -> Result<Proc> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("tmp"))?;
    let conf = prefix.join("nginx.conf");
    let p = prefix.display();
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp; uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;\n  sendfile on; tcp_nopush on;\n  default_type application/octet-stream;\n  server {{ listen {IP_A}:{HTTP_PORT}; root {root}; }}\n  server {{ listen {IP_A}:{HTTPS_PORT} ssl; ssl_protocols TLSv1.3; ssl_certificate {cert}; ssl_certificate_key {key}; root {root}; }}\n}}\n",
            root = root.display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )?;
    let mut cmd = in_ns(NS_A, "nginx");
    cmd.arg("-c").arg(&conf).arg("-p").arg(&prefix);
    Ok(Proc::spawn(&mut cmd, prefix.join("stderr.log")))
}

fn agent(bin: &Path, dir: &Path, ns: &str, peer: &str, secret: &Path, log: &str) -> Proc {
    let mut cmd = in_ns(ns, bin);
    cmd.arg("agent")
        .arg("--data-dir")
        .arg(dir.join(ns))
        .args(["--mirror-addr", MIRROR])
        .args(["--peer", &format!("{peer}:{PEER_PORT}")])
        .arg("--cluster-secret-file")
        .arg(secret)
        .arg("--no-default-registries")
        .args(["--registry", &format!("bench=http://{IP_A}:{HTTP_PORT}")])
        .args(["--cache-size", "4GiB"])
        .env("RUST_LOG", "peerd_agent=info");
    Proc::spawn(&mut cmd, dir.join(log))
}

/// Waits until `proc`'s log has any of `needles` at least `count` times in all.
fn wait_log(proc: &Proc, needles: &[&str], count: usize, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let text = proc.log_text();
        if needles.iter().map(|n| text.matches(n).count()).sum::<usize>() >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{needles:?} x{count} not logged within {within:?}: {}", text.lines().rev().take(20).collect::<Vec<_>>().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Sample {
    secs: f64,
    sender: f64,
    receiver: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn transport(size_mib: u64, runs: usize) -> Result<()> {
    let runs = runs.max(1);
    crate::build(true)?;
    let bin = crate::target_dir().join("release/peerd");
    for tool in ["nginx", "curl", "ip"] {
        xtask::components::require(tool);
    }
    let dir = std::env::temp_dir().join(format!("peerd-transport-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    eprintln!("bench: writing a {size_mib} MiB blob");
    let data = pseudo_random(size_mib << 20, 0x5DEE_CE66_D1CE_4E5B);
    let hex = sha256_hex(&data);
    let root = dir.join("www");
    let rel = format!("v2/bench/blobs/sha256:{hex}");
    std::fs::create_dir_all(root.join(&rel).parent().context("parent")?)?;
    std::fs::write(root.join(&rel), &data)?;
    drop(data);
    let gib = (size_mib as f64) / 1024.0;

    // B writes each copy into its store: without this the VM's free page reporting makes every
    // page cache write fault memory in from the host (see `GuestMemory`), a cost of this VM only.
    let memory = crate::bench::GuestMemory::keep(3 * (size_mib << 20));
    let pair = Pair::up()?;
    let ca = TestCa::create(&dir.join("ca"));
    let (cert, key) = ca.issue(IP_A, &[IP_A.parse()?]);
    let nginx = nginx(&dir, &root, &cert, &key)?;
    wait_up(NS_B, &format!("http://{IP_A}:{HTTP_PORT}/"), Duration::from_secs(10))?;
    let secret = dir.join("secret");
    std::fs::write(&secret, pseudo_random(32, 27))?;
    // A first, alone: it pulls the blob from the registry into its cache.
    let a = agent(&bin, &dir, NS_A, IP_B, &secret, "agent-a.log");
    wait_up(NS_A, &format!("http://{MIRROR}/healthz"), Duration::from_secs(20))?;
    let blob_url = format!("http://{MIRROR}/{rel}?ns=bench");
    eprintln!("bench: filling node A's cache");
    curl(NS_A, &blob_url, &[])?;
    wait_log(&a, &["cached from", "fetched from upstream for the cluster"], 1, Duration::from_secs(120))?;
    let b = agent(&bin, &dir, NS_B, IP_A, &secret, "agent-b.log");
    wait_up(NS_B, &format!("http://{MIRROR}/healthz"), Duration::from_secs(20))?;

    let cases = ["(a) agent to agent (QUIC peer protocol)", "(b) TLS 1.3 over kernel TCP (nginx HTTPS -> curl)", "(c) plain TCP sendfile (nginx HTTP -> curl)"];
    let mut samples: Vec<Vec<Sample>> = (0..cases.len()).map(|_| Vec::new()).collect();
    let https_url = format!("https://{IP_A}:{HTTPS_PORT}/{rel}");
    let http_url = format!("http://{IP_A}:{HTTP_PORT}/{rel}");
    let cacert = ca.ca_pem_path.display().to_string();
    // One untimed round: TLS session, access-check cache, page cache.
    for r in 0..=runs {
        for (i, _) in cases.iter().enumerate() {
            let (sender_pid, receiver_pid) = match i {
                0 => (a.pid(), Some(b.pid())),
                _ => (nginx.pid(), None),
            };
            let s0 = cpu_seconds(sender_pid);
            let r0 = receiver_pid.map(cpu_seconds).unwrap_or(0.0);
            let (secs, client_cpu, bytes) = match i {
                0 => curl(NS_B, &blob_url, &[])?,
                1 => curl(NS_B, &https_url, &["--tlsv1.3", "--cacert", &cacert])?,
                _ => curl(NS_B, &http_url, &[])?,
            };
            if bytes != size_mib << 20 {
                bail!("{}: {bytes} bytes, expected {}", cases[i], size_mib << 20);
            }
            if i == 0 {
                // B verifies and commits the blob before it is removed for the next round; its
                // CPU until then is the download's.
                wait_log(&b, &["downloaded from peers"], r + 1, Duration::from_secs(60))?;
            }
            let sender = cpu_seconds(sender_pid) - s0;
            let receiver = receiver_pid.map(|p| cpu_seconds(p) - r0).unwrap_or(0.0) + client_cpu;
            eprintln!("bench: round {r} {}: {:.2} GiB/s, sender {:.2} s, receiver {:.2} s", cases[i], gib / secs, sender, receiver);
            if r > 0 {
                samples[i].push(Sample { secs, sender, receiver });
            }
            if i == 0 {
                let out = in_ns(NS_B, "curl").args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", &format!("http://{MIRROR}/cache/sha256:{hex}")]).output()?;
                let code = String::from_utf8_lossy(&out.stdout).to_string();
                if code != "204" {
                    bail!("removing the blob from node B: HTTP {code}");
                }
            }
        }
    }
    drop(b);
    drop(a);
    drop(nginx);
    drop(pair);
    let memory_kept = memory.kept();
    drop(memory);

    let mut rows = vec![format!(
        "One {size_mib} MiB blob from node A to node B, two network namespaces joined by one veth pair, no shaping (MTU 1500), {runs} alternating runs of each case after one untimed round. CPU is user+sys seconds per GiB moved: the sender is A's agent (a) or nginx (b, c); the receiver is B's agent plus curl (a: B downloads from A over QUIC, checks every piece's blake3 and the blob's sha256, writes it to its store and streams it to curl over loopback) or curl alone (b, c: to /dev/null). nginx 1.22 with OpenSSL 3 (TLS 1.3, no kTLS), `sendfile on; tcp_nopush on`; agents started as a user would: `--peer`, `--peer-addr`, `--cluster-secret-file`, `--registry`. {}. Medians, min-max in brackets. The 2 cores were shared with other engineers' builds (load average {}).\n\n| case | GiB/s | sender CPU s/GiB | receiver CPU s/GiB | total CPU s/GiB |\n|---|---|---|---|---|",
        if memory_kept { "The VM's free page reporting was off and memory warmed first (`GuestMemory`), so B's store writes reuse memory the guest owns" } else { "Free page reporting could not be turned off: B's store writes may fault memory in from the host" },
        load()
    )];
    let mut totals = Vec::new();
    for (i, name) in cases.iter().enumerate() {
        let s = &samples[i];
        let tput: Vec<f64> = s.iter().map(|x| gib / x.secs).collect();
        let snd: Vec<f64> = s.iter().map(|x| x.sender / gib).collect();
        let rcv: Vec<f64> = s.iter().map(|x| x.receiver / gib).collect();
        let tot: Vec<f64> = s.iter().map(|x| (x.sender + x.receiver) / gib).collect();
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.2}-{:.2}", lo, hi)
        };
        totals.push(median(tot.clone()));
        rows.push(format!(
            "| {name} | {:.2} ({}) | {:.2} ({}) | {:.2} ({}) | {:.2} ({}) |",
            median(tput.clone()),
            range(&tput),
            median(snd.clone()),
            range(&snd),
            median(rcv.clone()),
            range(&rcv),
            median(tot.clone()),
            range(&tot)
        ));
    }
    rows.push(format!(
        "\nTotal CPU per GiB, (a) / (b): **{:.2}x**; (a) / (c): {:.2}x; (b) / (c): {:.2}x.",
        totals[0] / totals[1],
        totals[0] / totals[2],
        totals[1] / totals[2]
    ));
    let table = rows.join("\n");
    println!("{table}");
    record("Transport: one blob between two nodes, CPU per GiB", &table)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
