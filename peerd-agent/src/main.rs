//! `peerd`: the node agent and its command line.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peerd_agent::{
    config,
    containerd::{ContainerdConfig, ContainerdContent},
    mirror::{Cluster, Mirror, MirrorConfig, Registries},
    gossip::{Gossip, GossipConfig},
    peers::{GossipPeers, PeerDirectory, StaticPeers},
    redirect::{Transparent, TransparentConfig},
    store::{Store, StoreConfig},
    transfer::{Transfer, TransferConfig},
};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PeerData {
    Tcp,
    Quic,
}

#[derive(Parser)]
#[command(name = "peerd", about = "Peer-to-peer content cache for Kubernetes nodes", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
    /// Print the version, and whether this binary carries the kernel programs.
    Version,
    /// List or remove cached blobs on the local agent.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// The agent's mirror address.
        #[arg(long, global = true, env = "PEERD_MIRROR_ADDR", default_value = "127.0.0.1:30000")]
        addr: SocketAddr,
    },
    /// Fetch an image's blobs into the cluster ahead of a rollout: once from the registry (by the
    /// blobs' owners), with a copy on this node; other nodes then pull from peers.
    Preheat {
        /// `registry/name:tag` or `registry/name@sha256:...` (the registry as configured, e.g.
        /// docker.io/library/alpine:3.20).
        image: String,
        /// The agent's mirror address.
        #[arg(long, env = "PEERD_MIRROR_ADDR", default_value = "127.0.0.1:30000")]
        addr: SocketAddr,
    },
    /// The intercept CA for `--tls-intercept`.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
    /// Ask the local agent about itself: cache use, request counts, peers.
    Status {
        /// The agent's mirror address.
        #[arg(long, env = "PEERD_MIRROR_ADDR", default_value = "127.0.0.1:30000")]
        addr: SocketAddr,
        /// Print the agent's JSON as is.
        #[arg(long)]
        json: bool,
    },
}

/// Every flag can also be set as `PEERD_<FLAG>` (e.g. PEERD_MIRROR_ADDR) or as a key in the
/// config file (e.g. `mirror-addr = "..."`); the command line wins over the environment, which
/// wins over the file. Repeatable flags take comma-separated environment values.
#[derive(Subcommand)]
enum CacheAction {
    /// Every blob: digest, size, complete or how many pieces.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove one blob (`sha256:<hex>`).
    Rm { digest: String },
}

#[derive(Subcommand)]
enum CaAction {
    /// Create a CA in DIR (ca.crt to install on nodes, ca.key for the agents' Secret).
    Create { dir: PathBuf },
    /// Print the CA certificate (PEM) of DIR.
    Show { dir: PathBuf },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// TOML config file whose keys are these flags' long names.
    #[arg(long, env = "PEERD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the content cache and the agent's state.
    #[arg(long, env = "PEERD_DATA_DIR", default_value = "/var/lib/peerd")]
    data_dir: PathBuf,
    /// Address of the registry mirror (HTTP). Point containerd's hosts.toml here.
    #[arg(long, env = "PEERD_MIRROR_ADDR", default_value = "127.0.0.1:30000")]
    mirror_addr: SocketAddr,
    /// Upstream registry as NAME=URL (repeatable), e.g. docker.io=https://registry-1.docker.io.
    /// Requests name the registry by containerd's `ns=` parameter or the Host header.
    #[arg(long = "registry", env = "PEERD_REGISTRY", value_delimiter = ',')]
    registries: Vec<String>,
    /// Do not add the built-in registries (docker.io, ghcr.io, mcr.microsoft.com,
    /// registry.k8s.io, quay.io).
    #[arg(long, env = "PEERD_NO_DEFAULT_REGISTRIES")]
    no_default_registries: bool,
    /// Extra host the /blobs/ range proxy may fetch from (repeatable), e.g. a storage account.
    #[arg(long = "blob-host", env = "PEERD_BLOB_HOST", value_delimiter = ',')]
    blob_hosts: Vec<String>,
    /// Cache budget (e.g. 20GiB). Default: half the free space of the data dir's filesystem.
    #[arg(long, env = "PEERD_CACHE_SIZE", value_parser = config::parse_size)]
    cache_size: Option<u64>,
    /// Serve cached content to every client without asking the registry whether the client may
    /// read it. Only for clusters whose nodes all share the same registry credentials.
    #[arg(long, env = "PEERD_TRUST_CLUSTER")]
    trust_cluster: bool,
    /// Seconds an upstream "this credential may read this repository" answer is reused.
    #[arg(long, env = "PEERD_AUTH_TTL", default_value_t = 60)]
    auth_ttl: u64,
    /// Seconds to wait for an upstream response head (connect is bounded at 3 s, each body read
    /// at 30 s).
    #[arg(long, env = "PEERD_UPSTREAM_TIMEOUT", default_value_t = 15)]
    upstream_timeout: u64,
    /// Address of the peer transfer endpoint: QUIC on UDP, and the bulk channel on TCP at the
    /// same port (--peer-data tcp). Not opened by a node alone (no --seed, no --peer).
    #[arg(long, env = "PEERD_PEER_ADDR", default_value = "0.0.0.0:30002")]
    peer_addr: SocketAddr,
    /// How piece data travels between agents: `tcp` (TLS 1.3 on kernel TCP at the peer port's
    /// number, about half QUIC's CPU per byte; a peer not reachable on TCP is asked over QUIC)
    /// or `quic` (no TCP port opened). Manifests, bitfields and fetches always use QUIC.
    #[arg(long, env = "PEERD_PEER_DATA", value_enum, default_value_t = PeerData::Tcp)]
    peer_data: PeerData,
    /// The address other agents reach this one at. Default: --peer-addr when it is not a
    /// wildcard, else the address of the interface that routes to the first seed or peer (else
    /// the default route's), logged at start and shown by `peerd status`.
    #[arg(long, env = "PEERD_ADVERTISE_ADDR")]
    advertise_addr: Option<SocketAddr>,
    /// Another agent's peer address (repeatable): a fixed cluster. Without peers the agent runs
    /// alone.
    #[arg(long = "peer", env = "PEERD_PEER", value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// Gossip seeds, `host:port` or `ip:port` (repeatable; a headless Service name resolves to
    /// every agent). With seeds, peers and their content are found by gossip; without seeds and
    /// without --peer, the agent runs alone.
    #[arg(long = "seed", env = "PEERD_SEED", value_delimiter = ',')]
    seeds: Vec<String>,
    /// UDP address gossip listens on (used with --seed).
    #[arg(long, env = "PEERD_GOSSIP_ADDR", default_value = "0.0.0.0:30001")]
    gossip_addr: SocketAddr,
    /// Bytes per second of overhead chitchat's anti-entropy may send (0 = no limit). Every
    /// exchange carries a digest of all members (10-30 bytes each), so large clusters exchange
    /// less often instead of sending more; content changes travel as rumors either way. Deltas
    /// (state a peer lacked) are not charged; in steady state there are none, and 16,000 keeps a
    /// node under 20 KB/s with sealing.
    #[arg(long, env = "PEERD_GOSSIP_BUDGET", default_value_t = 16_000)]
    gossip_budget: u64,
    /// Topology zone of this node (peers in the same zone are preferred).
    #[arg(long, env = "PEERD_ZONE", default_value = "")]
    zone: String,
    /// File holding the cluster secret (peers authenticate with certificates derived from it).
    /// Default: <data-dir>/cluster-secret, generated when absent (fine for one node; a cluster
    /// shares one, e.g. from a Kubernetes Secret).
    #[arg(long, env = "PEERD_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// This node's name among peers. Default: `<hostname>-<random>`, kept in
    /// <data-dir>/node-id (unique even where host names collide).
    #[arg(long, env = "PEERD_NODE_ID")]
    node_id: Option<String>,
    /// containerd's hosts.toml directory (certs.d), read-only: `peerd status` then says which
    /// registries' pulls reach this mirror through hosts.toml (the chart's `auto` mode writes
    /// them for HTTPS registries).
    #[arg(long, env = "PEERD_HOSTS_TOML_DIR")]
    hosts_toml_dir: Option<PathBuf>,
    /// Connections the mirror serves at once; more get 503 and are closed.
    #[arg(long, env = "PEERD_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Upload limit to peers (bytes per second, e.g. 50M); unlimited by default.
    #[arg(long, env = "PEERD_UPLOAD_LIMIT", value_parser = config::parse_size)]
    upload_limit: Option<u64>,
    /// Download limit from peers (bytes per second); unlimited by default.
    #[arg(long, env = "PEERD_DOWNLOAD_LIMIT", value_parser = config::parse_size)]
    download_limit: Option<u64>,
    /// Limit on reading from upstream registries and blob stores (bytes per second, all fetches
    /// together); unlimited by default.
    #[arg(long, env = "PEERD_UPSTREAM_LIMIT", value_parser = config::parse_size)]
    upstream_limit: Option<u64>,
    /// Log format.
    #[arg(long, env = "PEERD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Transparent mode: redirect the node's connections to the configured registries (and blob
    /// hosts) to this agent with eBPF, so no containerd configuration is needed. Needs root (or
    /// CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    #[arg(long, env = "PEERD_TRANSPARENT")]
    transparent: bool,
    /// The cgroup whose processes are redirected, as /proc/<pid>/cgroup names it (default "/",
    /// the whole node).
    #[arg(long, env = "PEERD_CGROUP", default_value = "/")]
    cgroup: String,
    /// Where the cgroup v2 hierarchy is mounted (default: found in /proc/self/mountinfo, or
    /// mounted when none is). In a pod, mount the host's /sys/fs/cgroup and name it here.
    #[arg(long, env = "PEERD_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Port on 127.0.0.1 and ::1 that redirected connections land on.
    #[arg(long, env = "PEERD_REDIRECT_PORT", default_value_t = 30003)]
    redirect_port: u16,
    /// Milliseconds after the agent's last heartbeat at which the kernel stops redirecting.
    #[arg(long, env = "PEERD_FAIL_OPEN_MS", default_value_t = 1000)]
    fail_open_ms: u64,
    /// Seconds between DNS resolutions of the registry hosts.
    #[arg(long, env = "PEERD_DNS_REFRESH", default_value_t = 30)]
    dns_refresh: u64,
    /// Terminate redirected TLS with certificates from the cluster's intercept CA (nodes must
    /// trust it; see the README). Without it, TLS is relayed untouched.
    #[arg(long, env = "PEERD_TLS_INTERCEPT")]
    tls_intercept: bool,
    /// Directory of the intercept CA (ca.crt, ca.key). Default <data-dir>/intercept-ca, created
    /// when absent; a cluster shares one (create it with `peerd ca create DIR`).
    #[arg(long, env = "PEERD_TLS_CA_DIR")]
    tls_ca_dir: Option<PathBuf>,
    /// Interface for the XDP guard of the agent's UDP ports (repeatable; `none` for no guard).
    /// Default in transparent mode: every interface with a global address.
    #[arg(long = "guard-iface", env = "PEERD_GUARD_IFACE", value_delimiter = ',')]
    guard_ifaces: Vec<String>,
    /// Source prefix allowed to reach the agent's UDP ports, besides the guarded interfaces'
    /// own subnets (repeatable), e.g. 10.0.0.0/8.
    #[arg(long = "allow-cidr", env = "PEERD_ALLOW_CIDR", value_delimiter = ',', value_parser = peerd_agent::redirect::parse_cidr)]
    allow_cidrs: Vec<(std::net::IpAddr, u8)>,
    /// containerd's content directory: its blobs are advertised to peers and served to them from
    /// these files (read-only). Off, with an info log, when the directory does not exist.
    #[arg(long, env = "PEERD_CONTAINERD_CONTENT_DIR", default_value = peerd_agent::containerd::DEFAULT_DIR)]
    containerd_content_dir: PathBuf,
    /// Do not share the blobs in containerd's content store with peers.
    #[arg(long, env = "PEERD_NO_CONTAINERD_CONTENT")]
    no_containerd_content: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Pieces are 1 MiB buffers allocated and freed at link rate. glibc gives blocks that large
/// fresh mmaps, or trims freed heap back to the kernel, so each piece faulted in new pages
/// (page faults: 3.9% of the agents' profile in bench swarm N=8; none with this, though the
/// agents' CPU seconds moved within run-to-run noise). Freed memory is kept for reuse: the
/// agent's footprint is its peak of pieces in flight.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before the runtime's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() -> Result<()> {
    apply_config_file()?;
    match Cli::parse().cmd {
        Cmd::Version => {
            println!("peerd {}", env!("CARGO_PKG_VERSION"));
            println!("kernel programs: embedded ({} bytes)", peerd_agent::bpf::object_len());
            Ok(())
        }
        Cmd::Agent(args) => agent(*args),
        Cmd::Status { addr, json } => status(addr, json),
        Cmd::Cache { action, addr } => cache(addr, action),
        Cmd::Preheat { image, addr } => preheat(addr, &image),
        Cmd::Ca { action: CaAction::Create { dir } } => {
            let ca = peerd_agent::intercept::InterceptCa::create(&dir)?;
            println!("created {} (install it in the nodes' trust store) and its key beside it", ca.ca_path().display());
            Ok(())
        }
        Cmd::Ca { action: CaAction::Show { dir } } => {
            print!("{}", peerd_agent::intercept::InterceptCa::load(&dir)?.ca_pem());
            Ok(())
        }
    }
}

/// The admin API's client: one request to the agent's mirror listener, run on a small runtime
/// (the CLI is otherwise synchronous). `(status, body)`.
fn admin_request(addr: SocketAddr, method: reqwest::Method, path: &str) -> Result<(u16, bytes::Bytes)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(30)).build()?;
        let r = client
            .request(method, format!("http://{addr}{path}"))
            .send()
            .await
            .with_context(|| format!("no agent answering on {addr} (is `peerd agent` running?)"))?;
        let code = r.status().as_u16();
        Ok((code, r.bytes().await?))
    })
}

/// GET `path` as the admin type `T`.
fn admin_get<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<(T, bytes::Bytes)> {
    let (code, body) = admin_request(addr, reqwest::Method::GET, path)?;
    anyhow::ensure!(code == 200, "agent answered {code}: {}", String::from_utf8_lossy(&body));
    Ok((serde_json::from_slice(&body).context("the agent's answer does not match this CLI's version")?, body))
}

/// `peerd cache ls|rm`.
fn cache(addr: SocketAddr, action: CacheAction) -> Result<()> {
    match action {
        CacheAction::Ls { json } => {
            let (entries, raw): (Vec<peerd_agent::admin::CacheEntry>, _) = admin_get(addr, "/cache")?;
            if json {
                println!("{}", String::from_utf8_lossy(&raw));
                return Ok(());
            }
            println!("{:<73} {:>12} STATE", "DIGEST", "SIZE");
            for b in entries {
                let state = if b.complete { "complete".to_string() } else { format!("{}/{} pieces", b.pieces_present, b.pieces_total) };
                println!("{:<73} {:>12} {state}", b.digest, b.size);
            }
            Ok(())
        }
        CacheAction::Rm { digest } => {
            let (code, body) = admin_request(addr, reqwest::Method::DELETE, &format!("/cache/{digest}"))?;
            anyhow::ensure!(code == 204, "agent answered {code}: {}", String::from_utf8_lossy(&body));
            println!("removed {digest}");
            Ok(())
        }
    }
}

/// `peerd preheat`: POST /preheat on the agent, which fetches the image's blobs through the
/// normal miss path (peers, the rendezvous owner, upstream); progress lines become a bar.
fn preheat(addr: SocketAddr, image: &str) -> Result<()> {
    use peerd_agent::admin::PreheatLine;
    let q: String = image.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
        let mut r = client
            .post(format!("http://{addr}/preheat?image={q}"))
            .send()
            .await
            .with_context(|| format!("no agent answering on {addr} (is `peerd agent` running?)"))?;
        if r.status() != 200 {
            let code = r.status();
            anyhow::bail!("agent answered {code}: {}", r.text().await.unwrap_or_default());
        }
        let started = std::time::Instant::now();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = r.chunk().await? {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                match serde_json::from_slice::<PreheatLine>(&line).context("agent sent invalid progress")? {
                    PreheatLine::Error { error } => {
                        eprintln!();
                        anyhow::bail!("preheat failed: {error}");
                    }
                    PreheatLine::Done { blobs, total_bytes, .. } => {
                        eprintln!();
                        println!("preheated {image}: {blobs} blobs, {:.1} MiB in {:.1}s", total_bytes as f64 / 1048576.0, started.elapsed().as_secs_f64());
                        return Ok(());
                    }
                    PreheatLine::Blob { index, blobs, done_bytes, total_bytes, .. } => {
                        let pct = if total_bytes > 0 { done_bytes as f64 * 100.0 / total_bytes as f64 } else { 100.0 };
                        eprint!("\r[{:<20}] {pct:5.1}%  {:.1}/{:.1} MiB  blob {index}/{blobs}", "#".repeat((pct / 5.0) as usize), done_bytes as f64 / 1048576.0, total_bytes as f64 / 1048576.0);
                    }
                }
            }
        }
        anyhow::bail!("the agent closed the connection before finishing")
    })
}

/// `peerd status`: GET /status from the agent.
fn status(addr: SocketAddr, json: bool) -> Result<()> {
    let (v, raw): (peerd_agent::admin::Status, _) = admin_get(addr, "/status")?;
    if json {
        println!("{}", String::from_utf8_lossy(&raw));
        return Ok(());
    }
    // A second sample a second later gives transfer rates.
    std::thread::sleep(Duration::from_secs(1));
    let later = admin_get::<peerd_agent::admin::Status>(addr, "/status").map(|l| l.0).unwrap_or_else(|_| v.clone());
    let rate = |f: fn(&peerd_agent::admin::ByteCounts) -> u64| f(&later.bytes).saturating_sub(f(&v.bytes)) as f64 / 1048576.0;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let sc = &v.self_check;
    println!("peerd {}  node {} ({})  mode {}", v.version, sc.node_id, sc.hostname, sc.mode);
    if v.peer_addr.is_empty() {
        println!("peer address: (alone: no --seed, no --peer)");
    } else {
        println!("peer address: {} (from {}); seeds {:?} resolved to {} addresses; {} peers alive", v.peer_addr, sc.advertised_from, sc.seeds, sc.seeds_resolved, sc.peers_alive);
    }
    let pd = &v.peer_data;
    match pd.transport.as_str() {
        "" => {}
        "tcp" => {
            println!("peer data: TLS over TCP ({} piece requests, {} sent over QUIC instead)", pd.bulk_requests, pd.fallbacks);
            if !pd.listening {
                println!("  note: this node's TCP port is not open (in use?): peers send it piece data over QUIC");
            }
            if pd.fallbacks > 0 && pd.bulk_requests == 0 {
                println!("  note: no peer answered on TCP at its peer port (a firewall passing only UDP?): QUIC carries the data, at about twice the CPU");
            }
        }
        t => println!("peer data: {t}"),
    }
    for r in &sc.registries {
        println!("  registry {:<28} {:<8} {}", r.name, r.pulls, r.why);
    }
    for w in &sc.warnings {
        println!("  WARNING: {w}");
    }
    let c = &v.cache;
    println!("cache: {:.2} / {:.2} GiB, {} blobs ({} complete), {} evictions", gib(c.used_bytes), gib(c.budget_bytes), c.blobs, c.complete_blobs, c.evictions);
    println!("requests: {} hits, {} from peers, {} misses", v.requests.hits, v.requests.peer_hits, v.requests.misses);
    println!(
        "rates (MiB/s): upstream {:.1}, from peers {:.1}, to peers {:.1}, to clients {:.1}",
        rate(|b| b.from_upstream),
        rate(|b| b.from_peers),
        rate(|b| b.to_peers),
        rate(|b| b.to_clients_from_cache)
    );
    println!("transfers in progress: {}", later.in_progress.len());
    for t in &later.in_progress {
        println!("  {}  {:5.1}% of {:.1} MiB", t.digest, t.pieces_present as f64 * 100.0 / t.pieces_total.max(1) as f64, t.size as f64 / 1048576.0);
    }
    println!("peers: {}", v.peers.len());
    if !v.peers.is_empty() {
        println!("  {:<28} {:<22} {:<10} {:<10} {:<12} ADVERTISES", "ID", "ADDRESS", "ZONE", "STATE", "LAST SEEN");
        for p in &v.peers {
            let seen = p.last_seen_ms.map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0)).unwrap_or_else(|| "-".into());
            let ads = p.advertised.map_or("-".to_string(), |a| format!("{} blobs, {} partial", a.complete, a.partial));
            println!("  {:<28} {:<22} {:<10} {:<10} {:<12} {ads}", p.id, p.addr, p.zone, p.state, seen);
        }
    }
    Ok(())
}

/// Exports the config file's keys as PEERD_* variables the environment does not already set.
/// Runs before any thread exists (set_var is only sound then).
fn apply_config_file() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--config=").map(str::to_owned)))
        .or_else(|| std::env::var("PEERD_CONFIG").ok());
    let Some(path) = path else { return Ok(()) };
    let known: Vec<String> = <AgentArgs as clap::Args>::augment_args(clap::Command::new("agent"))
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .filter(|k| k != "config")
        .collect();
    for (k, v) in config::load(path.as_ref(), &known)? {
        if std::env::var_os(&k).is_none() {
            // SAFETY: single-threaded at this point (called first thing in main).
            unsafe { std::env::set_var(k, v) };
        }
    }
    Ok(())
}

fn default_cache_size(dir: &std::path::Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return 10 << 30 };
    // SAFETY: zeroed statvfs is valid storage; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 10 << 30;
    }
    (st.f_bavail as u64 * st.f_frsize as u64 / 2).max(1 << 30)
}

fn agent(args: AgentArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a container's stdout is a file, and `kubectl logs` would show
    // the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none();
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_ansi(ansi).with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data dir {}", args.data_dir.display()))?;
    let registries = Registries::new(&args.registries, !args.no_default_registries)?;
    let budget = args.cache_size.unwrap_or_else(|| default_cache_size(&args.data_dir));
    keep_freed_memory();
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let store = Store::open(args.data_dir.join("store"), StoreConfig::new(budget))
            .await
            .context("opening the content store")?;
        let cfg = MirrorConfig {
            registries,
            blob_hosts: args.blob_hosts,
            trust_cluster: args.trust_cluster,
            auth_ttl: Duration::from_secs(args.auth_ttl),
            head_timeout: Duration::from_secs(args.upstream_timeout),
            upstream_limit: args.upstream_limit,
            ..MirrorConfig::default()
        };
        let names: Vec<String> = cfg.registries.iter().map(|r| format!("{}={}", r.name, r.url)).collect();
        let mirror_registries: Vec<peerd_agent::mirror::Registry> = cfg.registries.iter().cloned().collect();
        let blob_hosts = cfg.blob_hosts.clone();
        let secret_file = args.cluster_secret_file.clone().unwrap_or_else(|| args.data_dir.join("cluster-secret"));
        let secret = cluster_secret(&secret_file, args.cluster_secret_file.is_none())?;
        let node_id = match args.node_id.clone() {
            Some(id) => id,
            None => peerd_agent::identity::node_id(&args.data_dir)?,
        };
        let alone = args.seeds.is_empty() && args.peers.is_empty();
        // Where peers dial us: never a wildcard (a cluster whose members advertise 0.0.0.0 never
        // forms). Seeds are resolved once here for the route; gossip keeps resolving them.
        let mut towards: Vec<SocketAddr> = args.peers.clone();
        for seed in &args.seeds {
            if let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(seed.as_str())).await {
                towards.extend(addrs);
            }
        }
        let seeds_resolved = towards.len() - args.peers.len();
        let (me, chosen) = peerd_agent::identity::advertise(args.peer_addr, args.advertise_addr, &towards);
        let secret_bytes = secret.clone();
        // A node alone has no peers to serve: no endpoint on every interface.
        let transfer = if alone {
            None
        } else {
            let mut tcfg = TransferConfig::new(args.peer_addr, node_id.clone(), secret);
            tcfg.upload_limit = args.upload_limit;
            tcfg.download_limit = args.download_limit;
            tcfg.bulk = args.peer_data == PeerData::Tcp;
            Some(Transfer::start(tcfg, store.clone()).context("starting the peer endpoint")?)
        };
        let containerd = match args.no_containerd_content || alone {
            true => None,
            false => ContainerdContent::start(ContainerdConfig::new(&args.containerd_content_dir, store.piece_size())).await,
        };
        let mut gossip_metrics: Option<std::sync::Arc<Gossip>> = None;
        let directory: Option<std::sync::Arc<dyn PeerDirectory>> = if !args.seeds.is_empty() {
            let mut g = GossipConfig::new(me, secret_bytes.clone());
            g.node_id = node_id.clone();
            g.listen_addr = args.gossip_addr;
            g.zone = args.zone.clone();
            g.seeds = args.seeds.clone();
            g.budget = args.gossip_budget;
            let gossip = std::sync::Arc::new(Gossip::start(g).await.context("starting gossip")?);
            tokio::spawn(peerd_agent::peers::advertise(gossip.clone(), store.clone(), containerd.clone()));
            gossip_metrics = Some(gossip.clone());
            Some(std::sync::Arc::new(GossipPeers { gossip, me, zone: args.zone.clone() }))
        } else if !args.peers.is_empty() {
            Some(std::sync::Arc::new(StaticPeers { me, peers: args.peers.clone() }))
        } else {
            None
        };
        let cluster = directory.zip(transfer.clone()).map(|(peers, transfer)| Cluster {
            transfer,
            peers,
            peer_budget: Duration::from_secs(120),
            owner_budget: Duration::from_secs(600),
        });
        let mirror = Mirror::new(cfg, store, args.data_dir.join("mirror"), cluster)?;
        if let Some(t) = &transfer {
            t.serve(peerd_agent::transfer::Handler { fetcher: Some(std::sync::Arc::new(mirror.coordinator().clone())), containerd: containerd.clone() });
            mirror.add_metrics_source(std::sync::Arc::new(t.clone()));
            if let Some(c) = &containerd {
                mirror.add_metrics_source(c.clone());
            }
        }
        if let Some(gossip) = gossip_metrics {
            mirror.add_metrics_source(gossip);
        }
        let listener = tokio::net::TcpListener::bind(args.mirror_addr)
            .await
            .with_context(|| format!("bind mirror address {}", args.mirror_addr))?;
        let transparent = if args.transparent {
            let intercept = if args.tls_intercept {
                let dir = args.tls_ca_dir.clone().unwrap_or_else(|| args.data_dir.join("intercept-ca"));
                let (ca, created) = peerd_agent::intercept::InterceptCa::load_or_create(&dir)?;
                if created {
                    tracing::warn!(ca = %ca.ca_path().display(), "created an intercept CA for this node only; a cluster should share one (peerd ca create)");
                }
                tracing::info!(ca = %ca.ca_path().display(), "TLS interception on: nodes must trust this CA");
                Some(std::sync::Arc::new(ca))
            } else {
                None
            };
            let guard_ifaces = match args.guard_ifaces.as_slice() {
                [] => None,
                [none] if none == "none" => Some(Vec::new()),
                list => Some(list.to_vec()),
            };
            let mut udp_ports = vec![args.peer_addr.port()];
            if !args.seeds.is_empty() {
                udp_ports.push(args.gossip_addr.port());
            }
            let tcfg = TransparentConfig {
                cgroup: args.cgroup.clone(),
                cgroup_root: args.cgroup_root.clone(),
                port: args.redirect_port,
                stale_after: Duration::from_millis(args.fail_open_ms),
                refresh: Duration::from_secs(args.dns_refresh.max(1)),
                registries: mirror_registries.clone(),
                blob_hosts: blob_hosts.clone(),
                intercept,
                guard_ifaces,
                allow: args.allow_cidrs.clone(),
                udp_ports,
            };
            let t = Transparent::start(tcfg, mirror.clone()).await.context("starting transparent mode")?;
            mirror.add_metrics_source(t.metrics_source());
            Some(t)
        } else {
            None
        };
        let info = peerd_agent::mirror::NodeInfo {
            node_id: node_id.clone(),
            hostname: peerd_agent::identity::hostname(),
            mode: if args.transparent { "transparent".into() } else { "mirror".into() },
            tls_intercept: args.transparent && args.tls_intercept,
            advertised: (!alone).then_some(me),
            advertised_how: chosen.to_string(),
            seeds: args.seeds.clone(),
            seeds_resolved,
            static_peers: args.peers.len(),
            hosts_toml_dir: args.hosts_toml_dir.clone(),
            mirror_port: args.mirror_addr.port(),
        };
        for line in mirror.set_node_info(info) {
            tracing::warn!("self-check: {line}");
        }
        tracing::info!(
            data_dir = %args.data_dir.display(),
            mirror = %args.mirror_addr,
            cache_bytes = budget,
            registries = ?names,
            peer = %if alone { "(alone: no --seed, no --peer)".to_string() } else { format!("{me} (from {chosen})") },
            peers = args.peers.len(),
            seeds = ?args.seeds,
            seeds_resolved,
            node = %node_id,
            "peerd agent started"
        );
        tokio::select! {
            r = mirror.serve(listener, args.max_connections) => r.context("mirror server")?,
            r = shutdown_signal() => r?,
            changed = follow_route(me, chosen.clone(), args.peer_addr, towards.clone(), alone) => {
                // Peers know this node by the address it advertised at start (gossip, rendezvous
                // ownership); a node whose address moved restarts to advertise the new one (its
                // supervisor, systemd or the kubelet, brings it back at once).
                tracing::error!("{changed}; exiting so the agent restarts with the new address");
                if let Some(t) = transparent {
                    t.shutdown();
                }
                anyhow::bail!("{changed}");
            }
        }
        tracing::info!("shutting down");
        if let Some(t) = transparent {
            t.shutdown();
        }
        Ok(())
    })
}

/// Reads the cluster secret; on a single node with the default path, creates one (32 random
/// bytes, mode 0600) when absent.
fn cluster_secret(path: &std::path::Path, may_create: bool) -> Result<Vec<u8>> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(s) if s.len() >= 16 => Ok(s),
        Ok(s) => anyhow::bail!("cluster secret {} is too short ({} bytes; at least 16)", path.display(), s.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
            let mut secret = vec![0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
                .with_context(|| format!("create {}", path.display()))?;
            f.write_all(&secret)?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "generated a cluster secret");
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("read cluster secret {}", path.display())),
    }
}

/// Raises the soft limit on open files to the hard limit: every client connection, peer
/// stream and cached file is a descriptor, and the usual soft limit (1024) is a denial of
/// service waiting to happen on a busy node.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Resolves when the address chosen for peers (from the route to the seeds or the default
/// route) no longer is the one the routing table would choose: the node's address changed. Never
/// for an address that was given (`--advertise-addr`, a non-wildcard `--peer-addr`) or a node
/// alone. Checked every 30 s; two checks in a row must agree (a route being replaced is not a
/// change).
async fn follow_route(me: SocketAddr, chosen: peerd_agent::identity::Chosen, listen: SocketAddr, towards: Vec<SocketAddr>, alone: bool) -> String {
    use peerd_agent::identity::Chosen;
    if alone || matches!(chosen, Chosen::Flag | Chosen::Listen) {
        return std::future::pending().await;
    }
    let mut seen_other = None;
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let (now, _) = peerd_agent::identity::advertise(listen, None, &towards);
        if now == me {
            seen_other = None;
        } else if seen_other == Some(now) {
            return format!("this node's address changed: it advertised {me}, the route now says {now}");
        } else {
            seen_other = Some(now);
        }
    }
}

async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
