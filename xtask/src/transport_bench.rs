//! `bench transport`: the CPU one blob costs to move between two nodes, side by side in one run,
//! on an unshaped veth pair between two network namespaces (addresses from 198.18.0.0/15, only
//! inside the namespaces this creates; removed on drop):
//! (a) agent to agent over the peer protocol: node A's agent holds the blob, node B's client
//!     fetches it through B's mirror (B downloads it from A over QUIC, verifies, stores it and
//!     streams it to the client);
//! (b) TLS 1.3 over kernel TCP: nginx HTTPS on A, curl on B (userspace TLS on both sides, no kTLS);
//! (c) plain HTTP with sendfile: nginx on A, curl on B (the floor).
//! Two more cases give the like-for-like comparison, since (a)'s receiver also verifies and
//! stores what (b)'s curl throws away:
//! (b2) as (b), curl's output piped to a sink in this process that does (a)'s receiving work:
//!      blake3 of each 1 MiB piece checked against a manifest, the blob's sha256, a write into a
//!      file on the same filesystem as the agents' stores;
//! (d) the agent's peer data path on kernel TCP instead of QUIC: rustls (same provider, TLS 1.3,
//!     mutual TLS with Ed25519 certificates from one CA, as the agent) between a sender thread in
//!     A that reads pieces from a file and a receiver thread in B doing (b2)'s sink work.
//! With `--baseline BIN` (a) also runs with that build of the agent, as (a0), in the same run.
//! Runs alternate between the cases so each sees the same machine. CPU is each process's
//! utime+stime (`/proc/<pid>/stat` for servers and agents, getrusage for curl, the thread's own
//! clock for the sinks and (d)'s threads).
use std::{
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::components::{children_cpu, cpu_seconds, pseudo_random, sha256_hex, Proc, TestCa};

use crate::results::record;

const NS_A: &str = "pd27a";
const NS_B: &str = "pd27b";
const IP_A: &str = "198.19.27.1";
const IP_B: &str = "198.19.27.2";
const HTTP_PORT: u16 = 8080;
const HTTPS_PORT: u16 = 8443;
const TLS_TCP_PORT: u16 = 8444;
const PIECE: usize = 1 << 20;

/// Where one agent listens (two builds run side by side with `--baseline`).
struct Ports {
    mirror: &'static str,
    peer: u16,
    /// Further flags of this pair of agents.
    extra: &'static [&'static str],
}

/// The agent's defaults: the agents under test are started without port flags, as a user would.
const PORTS: Ports = Ports { mirror: "127.0.0.1:30000", peer: 30002, extra: &[] };
/// The baseline build runs beside them, so it needs ports of its own.
const BASELINE_PORTS: Ports = Ports { mirror: "127.0.0.1:30010", peer: 30012, extra: &[] };
/// This build again with `--peer-data quic`: every byte over QUIC, as before the bulk channel.
const QUIC_PORTS: Ports = Ports { mirror: "127.0.0.1:30020", peer: 30022, extra: &["--peer-data", "quic"] };

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

/// CPU seconds (user+sys) of the calling thread.
fn thread_cpu() -> f64 {
    // SAFETY: clock_gettime writes into the struct we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Moves the calling thread (only it) into network namespace `ns`.
fn enter_ns(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("open netns {ns}"))?;
    // SAFETY: setns on an fd we own; CLONE_NEWNET affects only this thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The receiving work of an agent, for the TCP cases: each 1 MiB piece checked against its
/// blake3, the blob's sha256, the bytes written to a file (space reserved first, as the store
/// does).
struct Verifier<'a> {
    file: std::fs::File,
    sha: sha2::Sha256,
    manifest: &'a [blake3::Hash],
    piece: usize,
}

impl<'a> Verifier<'a> {
    fn create(path: &Path, size: u64, manifest: &'a [blake3::Hash]) -> Result<Self> {
        use sha2::Digest as _;
        let _ = std::fs::remove_file(path);
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, size as libc::off_t) } != 0 {
            file.set_len(size)?;
        }
        Ok(Verifier { file, sha: sha2::Sha256::new(), manifest, piece: 0 })
    }

    fn piece(&mut self, bytes: &[u8]) -> Result<()> {
        use sha2::Digest as _;
        if self.manifest.get(self.piece) != Some(&blake3::hash(bytes)) {
            bail!("piece {} does not match its blake3", self.piece);
        }
        self.sha.update(bytes);
        self.file.write_all_at(bytes, (self.piece * PIECE) as u64)?;
        self.piece += 1;
        Ok(())
    }

    fn finish(self, hex: &str) -> Result<()> {
        use sha2::Digest as _;
        let got: String = self.sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != hex {
            bail!("sha256 {got}, expected {hex}");
        }
        Ok(())
    }
}

/// Fills `buf` from `r` unless the stream ends first; the bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// (b2): curl in `ns` writing to a pipe read by a verifying sink on this thread: (seconds,
/// curl's and the sink's CPU seconds, bytes).
fn curl_verified(ns: &str, url: &str, extra: &[&str], out: &Path, size: u64, manifest: &[blake3::Hash], hex: &str) -> Result<(f64, f64, u64)> {
    let (t0, before, sink0) = (Instant::now(), children_cpu(), thread_cpu());
    let mut child = in_ns(ns, "curl")
        .args(["-sS", "--fail", "--max-time", "300"])
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run curl")?;
    let mut pipe = child.stdout.take().context("curl stdout")?;
    let mut sink = Verifier::create(out, size, manifest)?;
    let mut buf = vec![0u8; PIECE];
    let mut bytes = 0u64;
    loop {
        let n = fill(&mut pipe, &mut buf)?;
        if n == 0 {
            break;
        }
        sink.piece(&buf[..n])?;
        bytes += n as u64;
    }
    let sink_cpu = thread_cpu() - sink0;
    let out = child.wait_with_output()?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    sink.finish(hex)?;
    Ok((secs, children_cpu() - before + sink_cpu, bytes))
}

/// Credentials for (d), made as the agent makes its own (`transfer::tls`): an Ed25519 CA and a
/// node certificate for each side, both with no usage restriction (each is client and server).
struct TlsPair {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn tls_pair() -> Result<TlsPair> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    // The agent's order (`transfer::tls`): AES-128-GCM first.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let ca_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "bench cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = params.self_signed(&ca_key)?;
    let issuer = Issuer::new(params, ca_key);
    let node = |name: &str| -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut p = CertificateParams::new(vec!["peerd.cluster".to_string()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &issuer)?;
        Ok((vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let roots = Arc::new(roots);
    let (server_chain, server_key) = node("a")?;
    let (client_chain, client_key) = node("b")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_chain, server_key)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)?;
    Ok(TlsPair { server: Arc::new(server), client: Arc::new(client) })
}

/// (d): one blob over rustls on kernel TCP from a sender thread in A (pieces read from `src`
/// into one reused buffer, as the agent's pooled piece reads) to a receiver thread in B that
/// verifies and stores each piece. (seconds, sender CPU, receiver CPU, cipher suite).
fn rustls_tcp(tls: &TlsPair, src: &Path, out: &Path, size: u64, manifest: &[blake3::Hash], hex: &str) -> Result<(f64, f64, f64, String)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let server_cfg = tls.server.clone();
    let src = src.to_owned();
    let sender = std::thread::spawn(move || -> Result<(f64, String)> {
        let listener = enter_ns(NS_A).and_then(|()| Ok(std::net::TcpListener::bind((IP_A, TLS_TCP_PORT))?));
        let listener = match listener {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow::anyhow!("{e}")));
                return Err(e);
            }
        };
        let (tcp, _) = listener.accept()?;
        let cpu0 = thread_cpu();
        let file = std::fs::File::open(&src)?;
        let mut conn = rustls::StreamOwned::new(rustls::ServerConnection::new(server_cfg)?, tcp);
        let mut buf = vec![0u8; PIECE];
        let mut off = 0u64;
        while off < size {
            let len = (size - off).min(PIECE as u64) as usize;
            file.read_exact_at(&mut buf[..len], off)?;
            conn.write_all(&buf[..len])?;
            off += len as u64;
        }
        conn.conn.send_close_notify();
        conn.flush()?;
        let suite = conn.conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        // Wait for the receiver to close, so the last bytes' ACKs are on this side's bill.
        let mut rest = Vec::new();
        let _ = conn.sock.read_to_end(&mut rest);
        Ok((thread_cpu() - cpu0, suite))
    });
    ready_rx.recv().context("sender thread")??;
    let client_cfg = tls.client.clone();
    let out = out.to_owned();
    let (manifest, hex) = (manifest.to_vec(), hex.to_owned());
    let t0 = Instant::now();
    let receiver = std::thread::spawn(move || -> Result<f64> {
        enter_ns(NS_B)?;
        let cpu0 = thread_cpu();
        let tcp = std::net::TcpStream::connect((IP_A, TLS_TCP_PORT))?;
        let name = rustls::pki_types::ServerName::try_from("peerd.cluster")?;
        let mut conn = rustls::StreamOwned::new(rustls::ClientConnection::new(client_cfg, name)?, tcp);
        let mut sink = Verifier::create(&out, size, &manifest)?;
        let mut buf = vec![0u8; PIECE];
        let mut got = 0u64;
        while got < size {
            let len = (size - got).min(PIECE as u64) as usize;
            conn.read_exact(&mut buf[..len])?;
            sink.piece(&buf[..len])?;
            got += len as u64;
        }
        sink.finish(&hex)?;
        drop(conn);
        Ok(thread_cpu() - cpu0)
    });
    let receiver_cpu = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    let (sender_cpu, suite) = sender.join().map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    Ok((secs, sender_cpu, receiver_cpu, suite))
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

fn agent(bin: &Path, dir: &Path, ns: &str, peer: &str, secret: &Path, log: &str, ports: &Ports) -> Proc {
    let mut cmd = in_ns(ns, bin);
    cmd.arg("agent")
        .arg("--data-dir")
        .arg(dir.join(format!("{ns}-{}", ports.peer)))
        .args(["--peer", &format!("{peer}:{}", ports.peer)])
        .arg("--cluster-secret-file")
        .arg(secret)
        .arg("--no-default-registries")
        .args(["--registry", &format!("bench=http://{IP_A}:{HTTP_PORT}")])
        .args(["--cache-size", "4GiB"])
        // The store's debug line at completion says how many pieces the sha256 took from memory.
        .env("RUST_LOG", "peerd_agent=info,peerd_agent::store=debug");
    if ports.peer != PORTS.peer {
        cmd.args(["--mirror-addr", ports.mirror]).args(["--peer-addr", &format!("0.0.0.0:{}", ports.peer)]);
    }
    cmd.args(ports.extra);
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
    /// The part of `receiver` that is the client's (curl; in (a), reading from B's agent over
    /// loopback, work (b2) and (d) do not have).
    client: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn transport(size_mib: u64, runs: usize, baseline: Option<&Path>) -> Result<()> {
    // The sinks of (b2) and (d) run in this process: in `cargo xtask`'s debug build their
    // hashing glue and rustls would cost several times what they cost optimized, which would
    // flatter (a). So the measuring is done by an optimized build of this tool.
    if cfg!(debug_assertions) {
        crate::status(Command::new("cargo").current_dir(crate::root()).args(["build", "--quiet", "--release", "-p", "xtask"]))?;
        crate::build(true)?;
        let me = crate::target_dir().join("release/xtask");
        return crate::status(Command::new(me).current_dir(crate::root()).args(std::env::args_os().skip(1)));
    }
    let runs = runs.max(1);
    crate::build(true)?;
    let bin = crate::target_dir().join("release/peerd");
    for tool in ["nginx", "curl", "ip"] {
        xtask::components::require(tool);
    }
    if let Some(b) = baseline {
        if !b.is_file() {
            bail!("--baseline {}: no such file", b.display());
        }
    }
    let dir = std::env::temp_dir().join(format!("peerd-transport-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    eprintln!("bench: writing a {size_mib} MiB blob");
    let size = size_mib << 20;
    let data = pseudo_random(size, 0x5DEE_CE66_D1CE_4E5B);
    let hex = sha256_hex(&data);
    let manifest: Vec<blake3::Hash> = data.chunks(PIECE).map(blake3::hash).collect();
    let root = dir.join("www");
    let rel = format!("v2/bench/blobs/sha256:{hex}");
    let blob_path = root.join(&rel);
    std::fs::create_dir_all(blob_path.parent().context("parent")?)?;
    std::fs::write(&blob_path, &data)?;
    drop(data);
    let gib = (size_mib as f64) / 1024.0;

    // B writes each copy into its store (and the sinks into a file): without this the VM's free
    // page reporting makes every page cache write fault memory in from the host (see
    // `GuestMemory`), a cost of this VM only.
    let memory = crate::guest::GuestMemory::keep(5 * size);
    let pair = Pair::up()?;
    let ca = TestCa::create(&dir.join("ca"));
    let (cert, key) = ca.issue(IP_A, &[IP_A.parse()?]);
    let nginx = nginx(&dir, &root, &cert, &key)?;
    wait_up(NS_B, &format!("http://{IP_A}:{HTTP_PORT}/"), Duration::from_secs(10))?;
    let secret = dir.join("secret");
    std::fs::write(&secret, pseudo_random(32, 27))?;
    let tls = tls_pair()?;
    let sink_file = dir.join("sink.data");

    // Each build's pair of agents: A first, alone, pulls the blob from the registry into its
    // cache; then B, which downloads it from A in every round.
    let mut builds: Vec<(Proc, Proc, &Ports)> = Vec::new();
    let each = [(bin.as_path(), &PORTS, ""), (bin.as_path(), &QUIC_PORTS, "-quic")];
    for (bin, ports, tag) in each.into_iter().chain(baseline.map(|b| (b, &BASELINE_PORTS, "-baseline"))) {
        let a = agent(bin, &dir, NS_A, IP_B, &secret, &format!("agent-a{tag}.log"), ports);
        wait_up(NS_A, &format!("http://{}/healthz", ports.mirror), Duration::from_secs(20))?;
        eprintln!("bench: filling node A's cache{tag}");
        curl(NS_A, &format!("http://{}/{rel}?ns=bench", ports.mirror), &[])?;
        wait_log(&a, &["cached from", "fetched from upstream for the cluster"], 1, Duration::from_secs(120))?;
        let b = agent(bin, &dir, NS_B, IP_A, &secret, &format!("agent-b{tag}.log"), ports);
        wait_up(NS_B, &format!("http://{}/healthz", ports.mirror), Duration::from_secs(20))?;
        builds.push((a, b, ports));
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Case {
        Agent(usize),
        Https,
        HttpsVerified,
        Http,
        RustlsTcp,
    }
    let mut cases = vec![
        (Case::Agent(0), "(a) agent to agent (peer protocol, defaults: piece data on TLS over TCP)".to_string()),
        (Case::Agent(1), "(aq) as (a), `--peer-data quic` (every byte over QUIC)".to_string()),
    ];
    if baseline.is_some() {
        cases.push((Case::Agent(2), format!("(a0) as (a), baseline build `{}`", baseline.map(|b| b.display().to_string()).unwrap_or_default())));
    }
    cases.push((Case::Https, "(b) TLS 1.3 over kernel TCP (nginx HTTPS -> curl)".into()));
    cases.push((Case::HttpsVerified, "(b2) as (b), receiver also verifies and stores (curl -> blake3 per piece, sha256, file)".into()));
    cases.push((Case::Http, "(c) plain TCP sendfile (nginx HTTP -> curl)".into()));
    cases.push((Case::RustlsTcp, "(d) peer data path on kernel TCP (rustls mTLS, piece reads -> verify and store)".into()));
    let mut samples: Vec<Vec<Sample>> = (0..cases.len()).map(|_| Vec::new()).collect();
    let https_url = format!("https://{IP_A}:{HTTPS_PORT}/{rel}");
    let http_url = format!("http://{IP_A}:{HTTP_PORT}/{rel}");
    let cacert = ca.ca_pem_path.display().to_string();
    let tls_args = ["--tlsv1.3", "--cacert", cacert.as_str()];
    // Pieces the receiving agents' sha256 took from memory and from the file, per build.
    let mut sha_from: Vec<(usize, usize)> = vec![(0, 0); builds.len()];
    let mut suite = String::new();
    // One untimed round: TLS session, access-check cache, page cache.
    for r in 0..=runs {
        for (i, (case, name)) in cases.iter().enumerate() {
            let (sender_pid, receiver_pid) = match case {
                Case::Agent(k) => (Some(builds[*k].0.pid()), Some(builds[*k].1.pid())),
                Case::RustlsTcp => (None, None),
                _ => (Some(nginx.pid()), None),
            };
            let s0 = sender_pid.map(cpu_seconds).unwrap_or(0.0);
            let r0 = receiver_pid.map(cpu_seconds).unwrap_or(0.0);
            let (secs, client_cpu, bytes, own_sender) = match case {
                Case::Agent(k) => {
                    let (secs, cpu, bytes) = curl(NS_B, &format!("http://{}/{rel}?ns=bench", builds[*k].2.mirror), &[])?;
                    (secs, cpu, bytes, 0.0)
                }
                Case::Https => {
                    let (secs, cpu, bytes) = curl(NS_B, &https_url, &tls_args)?;
                    (secs, cpu, bytes, 0.0)
                }
                Case::HttpsVerified => {
                    let (secs, cpu, bytes) = curl_verified(NS_B, &https_url, &tls_args, &sink_file, size, &manifest, &hex)?;
                    (secs, cpu, bytes, 0.0)
                }
                Case::Http => {
                    let (secs, cpu, bytes) = curl(NS_B, &http_url, &[])?;
                    (secs, cpu, bytes, 0.0)
                }
                Case::RustlsTcp => {
                    let (secs, snd, rcv, s) = rustls_tcp(&tls, &blob_path, &sink_file, size, &manifest, &hex)?;
                    suite = s;
                    (secs, rcv, size, snd)
                }
            };
            if bytes != size {
                bail!("{name}: {bytes} bytes, expected {size}");
            }
            if let Case::Agent(k) = case {
                // B verifies and commits the blob before it is removed for the next round; its
                // CPU until then is the download's.
                let b = &builds[*k].1;
                wait_log(b, &["downloaded from peers"], r + 1, Duration::from_secs(60))?;
                if r > 0 {
                    if let Some((m, f)) = sha_counts(&b.log_text()).last() {
                        sha_from[*k].0 += m;
                        sha_from[*k].1 += f;
                    }
                }
            }
            let sender = sender_pid.map(|p| cpu_seconds(p) - s0).unwrap_or(0.0) + own_sender;
            let receiver = receiver_pid.map(|p| cpu_seconds(p) - r0).unwrap_or(0.0) + client_cpu;
            eprintln!("bench: round {r} {name}: {:.2} GiB/s, sender {:.2} s, receiver {:.2} s (load {})", gib / secs, sender, receiver, load());
            if r > 0 {
                let client = if *case == Case::RustlsTcp { 0.0 } else { client_cpu };
                samples[i].push(Sample { secs, sender, receiver, client });
            }
            if let Case::Agent(k) = case {
                let mirror = builds[*k].2.mirror;
                let out = in_ns(NS_B, "curl").args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", &format!("http://{mirror}/cache/sha256:{hex}")]).output()?;
                let code = String::from_utf8_lossy(&out.stdout).to_string();
                if code != "204" {
                    bail!("removing the blob from node B: HTTP {code}");
                }
            }
            let _ = std::fs::remove_file(&sink_file);
        }
    }
    drop(builds);
    drop(nginx);
    drop(pair);
    let memory_kept = memory.kept();
    drop(memory);

    let mut rows = vec![format!(
        "One {size_mib} MiB blob from node A to node B, two network namespaces joined by one veth pair, no shaping (MTU 1500), {runs} alternating runs of each case after one untimed round. CPU is user+sys seconds per GiB moved: the sender is A's agent (a) or nginx (b, c) or the sending thread (d); the receiver is B's agent plus curl (a, aq: B downloads from A over the peer protocol, checks every piece's blake3 and the blob's sha256, writes it to its store and streams it to curl over loopback), curl alone (b, c: to /dev/null), curl plus a sink doing the agent's verification and store write (b2), or the receiving thread doing the same (d). nginx 1.22 with OpenSSL 3 (TLS 1.3, no kTLS: this kernel has no `CONFIG_TLS`), `sendfile on; tcp_nopush on`; (d) rustls 0.23 with ring, TLS 1.3, mutual TLS with Ed25519 certificates as the agent ({suite}); agents started as a user would: `--peer`, `--cluster-secret-file`, `--registry` (a baseline build beside them also gets `--mirror-addr` and `--peer-addr`). {}. Medians, min-max in brackets. The 2 cores were shared with other engineers' builds and simulations (load average at the end {}).\n\n| case | GiB/s | sender CPU s/GiB | receiver CPU s/GiB | total CPU s/GiB |\n|---|---|---|---|---|",
        if memory_kept { "The VM's free page reporting was off and memory warmed first (`GuestMemory`), so B's store writes reuse memory the guest owns" } else { "Free page reporting could not be turned off: B's store writes may fault memory in from the host" },
        load()
    )];
    let mut totals = Vec::new();
    for (i, (_, name)) in cases.iter().enumerate() {
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
    let total = |c: Case| cases.iter().position(|(k, _)| *k == c).map(|i| totals[i]).unwrap_or(f64::NAN);
    let a = total(Case::Agent(0));
    rows.push(format!(
        "\nTotal CPU per GiB, (a) / (b): **{:.2}x**; (a) / (b2): **{:.2}x**; (a) / (aq): **{:.2}x**; (a) / (d): {:.2}x; (d) / (b2): {:.2}x; (a) / (c): {:.2}x; (b) / (c): {:.2}x.",
        a / total(Case::Https),
        a / total(Case::HttpsVerified),
        a / total(Case::Agent(1)),
        a / total(Case::RustlsTcp),
        total(Case::RustlsTcp) / total(Case::HttpsVerified),
        a / total(Case::Http),
        total(Case::Https) / total(Case::Http)
    ));
    if baseline.is_some() {
        rows.push(format!("(a) / (a0), this build against the baseline: {:.2}x.", a / total(Case::Agent(2))));
    }
    // (a)'s receiver includes curl reading the blob from B's agent over loopback.
    if let Some(i) = cases.iter().position(|(k, _)| *k == Case::Agent(0)) {
        let client = median(samples[i].iter().map(|x| x.client / gib).collect());
        rows.push(format!(
            "Of (a)'s receiver, curl reading the blob from B's agent over loopback: {client:.2} s/GiB; without it (a) totals {:.2} s/GiB, {:.2}x (d).",
            a - client,
            (a - client) / total(Case::RustlsTcp)
        ));
    }
    for (k, (m, f)) in sha_from.iter().enumerate() {
        let which = ["(a)", "(aq)", "(a0)"].get(k).copied().unwrap_or("?");
        if m + f > 0 {
            rows.push(format!("{which}: the receiving agent's sha256 took {m} pieces from memory and read {f} back from its file (timed rounds)."));
        }
    }
    let table = rows.join("\n");
    println!("{table}");
    record("Transport: one blob between two nodes, CPU per GiB", &table)
}

/// (from memory, from file) of each "blob complete" line the store logged.
fn sha_counts(log: &str) -> Vec<(usize, usize)> {
    let field = |line: &str, key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok());
    log.lines()
        .filter(|l| l.contains("blob complete"))
        .filter_map(|l| Some((field(l, "sha256_pieces_from_memory=")?, field(l, "sha256_pieces_from_file=")?)))
        .collect()
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
