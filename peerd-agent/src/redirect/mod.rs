//! Transparent mode: the node's registry connections, redirected to the agent by the kernel
//! (cgroup connect4/connect6), served by the mirror without any containerd configuration.
//!
//! One place ties the kernel programs to the agent: load and attach them, keep the redirect table
//! in step with DNS, prove liveness (the heartbeat; if the agent hangs, redirects stop within the
//! bound, and if it dies the programs go with its file descriptors), and handle each redirected
//! connection: plain HTTP is served by the mirror; TLS is terminated with a certificate from the
//! cluster's intercept CA when the operator opted in (the nodes trust that CA), and otherwise
//! relayed untouched to where the client was going. Requests the mirror does not serve (pushes,
//! token endpoints, `/v2/`) are relayed too, so nothing that worked without the agent breaks.
mod guard;
mod relay;
mod targets;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use aya::programs::XdpMode;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

pub use guard::parse_cidr;

use crate::{
    bpf::{BpfError, Kernel},
    intercept::{self, InterceptCa, Sni},
    mirror::{Handback, Mirror, Registry, Stream},
};

/// Transparent mode settings.
#[derive(Clone)]
pub struct TransparentConfig {
    /// Where the cgroup v2 hierarchy is mounted (default: found in mountinfo, or mounted at
    /// /run/peerd/cgroup2 when none is, e.g. under `ip netns exec`, which remounts /sys).
    pub cgroup_root: Option<PathBuf>,
    /// The cgroup whose processes are redirected, as /proc/<pid>/cgroup names it ("/" is the
    /// whole node).
    pub cgroup: String,
    /// Port of the redirect listener on 127.0.0.1 and ::1 (the kernel rewrites to these).
    pub port: u16,
    /// Redirects stop this long after the agent's last heartbeat.
    pub stale_after: Duration,
    /// How often registry host names are resolved again.
    pub refresh: Duration,
    /// Registries (from the mirror's configuration) and blob hosts to redirect.
    pub registries: Vec<Registry>,
    pub blob_hosts: Vec<String>,
    /// Terminate TLS with certificates from this CA (`--tls-intercept`).
    pub intercept: Option<Arc<InterceptCa>>,
    /// XDP guard: interfaces (None: the defaults; empty: no guard), allowed sources (added to the
    /// interfaces' own subnets), and the UDP ports to guard.
    pub guard_ifaces: Option<Vec<String>>,
    pub allow: Vec<(IpAddr, u8)>,
    pub udp_ports: Vec<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("redirect listener {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("mounting cgroup2 at {path}: {source}")]
    Mount { path: PathBuf, source: std::io::Error },
    #[error("listing network interfaces: {0}")]
    Interfaces(std::io::Error),
}

/// Reason-coded counts of what happened to redirected connections (the kernel's own are in the
/// BPF counters).
#[derive(Default, Debug)]
pub struct Counters {
    /// Plain HTTP connections handed to the mirror.
    pub http: AtomicU64,
    /// TLS connections terminated with an intercept certificate.
    pub tls_intercepted: AtomicU64,
    /// TLS connections relayed untouched (no `--tls-intercept`, or not a registry).
    pub tls_passthrough: AtomicU64,
    /// Connections (or their remainders) relayed because the mirror does not serve the request.
    pub relayed_requests: AtomicU64,
    /// Accepted connections whose original destination the kernel no longer knew (closed).
    pub orig_dst_unknown: AtomicU64,
    /// Failures to reach the original destination for a relay.
    pub relay_errors: AtomicU64,
    /// TLS handshakes with clients that failed (e.g. the node does not trust the CA).
    pub tls_handshake_errors: AtomicU64,
    /// Heartbeats that could not be written (redirects fail open after the bound).
    pub heartbeat_errors: AtomicU64,
}

/// Running transparent mode. [`Transparent::shutdown`] (or dropping it) detaches everything.
pub struct Transparent {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    /// `None` once shut down: the programs are detached with the last reference to their links.
    kernel: Mutex<Option<Kernel>>,
    mirror: Mirror,
    /// Resolved address -> the registry dialled there.
    registries: RwLock<BTreeMap<SocketAddr, Registry>>,
    redirected: Mutex<BTreeSet<SocketAddr>>,
    listeners: Vec<SocketAddr>,
    intercept: Option<Arc<InterceptCa>>,
    roots: Arc<rustls::RootCertStore>,
    counters: Counters,
    guarded: Vec<String>,
}

impl Transparent {
    /// Loads and attaches the programs, starts the redirect listeners, fills the redirect table,
    /// and exempts the agent's own connections. Needs root (or CAP_BPF, CAP_NET_ADMIN,
    /// CAP_SYS_ADMIN).
    pub async fn start(cfg: TransparentConfig, mirror: Mirror) -> Result<Self, RedirectError> {
        let mut kernel = Kernel::load()?;
        kernel.set_stale_after(cfg.stale_after)?;
        kernel.heartbeat()?;
        let root = match &cfg.cgroup_root {
            // A hybrid host's v2 hierarchy sits at <root>/unified.
            Some(p) if !p.join("cgroup.procs").exists() && p.join("unified/cgroup.procs").exists() => p.join("unified"),
            Some(p) => p.clone(),
            None => cgroup_root()?,
        };
        let cgroup = root.join(cfg.cgroup.trim_start_matches('/'));
        // Listeners first: the kernel must never rewrite to a port nobody listens on.
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
            let addr = SocketAddr::new(ip, cfg.port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    bound.push(l.local_addr().map_err(|source| RedirectError::Listen { addr, source })?);
                    listeners.push(l);
                }
                // A node without IPv6 on loopback still redirects IPv4 (IPv6 registries fail open).
                Err(e) if ip.is_ipv6() => warn!("no IPv6 redirect listener on {addr}: {e}; IPv6 registry addresses are not redirected"),
                Err(source) => return Err(RedirectError::Listen { addr, source }),
            }
        }
        // Only this network namespace is redirected (the listeners are on its loopback).
        kernel.set_netns_of(&listeners[0])?;
        kernel.attach_cgroup(&cgroup)?;
        // Registration goes to a throwaway listener, so no stray connection reaches the real one.
        let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr().map(|a| (l, a)))
            .map_err(|source| RedirectError::Listen { addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), source })?;
        let exempt = kernel.exempt_self(probe.1)?;
        drop(probe);
        match exempt {
            Some(pid) => info!(pid, "the agent's own connections are exempt from redirects"),
            None => info!("the agent runs outside {}; its connections are not redirected anyway", cgroup.display()),
        }

        let mut guarded = Vec::new();
        if !cfg.udp_ports.is_empty() {
            let addrs = guard::interface_addresses().map_err(RedirectError::Interfaces)?;
            let (default_ifaces, mut allow) = guard::defaults(&addrs);
            let ifaces = cfg.guard_ifaces.clone().unwrap_or(default_ifaces);
            if !ifaces.is_empty() {
                allow.extend(cfg.allow.iter().copied());
                // Loopback is never guarded (XDP is not attached there) but the trie allows it
                // for clarity when interfaces are named explicitly.
                for (ip, len) in &allow {
                    kernel.allow_prefix(*ip, *len)?;
                }
                for p in &cfg.udp_ports {
                    kernel.guard_port(*p)?;
                }
                for i in &ifaces {
                    // Native (driver) mode where the driver has it, generic otherwise.
                    let r = kernel.attach_xdp(i, XdpMode::Driver).or_else(|_| kernel.attach_xdp(i, XdpMode::Skb));
                    match r {
                        Ok(()) => guarded.push(i.clone()),
                        Err(e) => warn!(iface = %i, "XDP guard not attached: {e}"),
                    }
                }
                info!(ifaces = ?guarded, ports = ?cfg.udp_ports, allowed = ?allow, "XDP guard on the agent's UDP ports");
            }
        }

        let roots = Arc::new(native_roots());
        let shared = Arc::new(Shared {
            kernel: Mutex::new(Some(kernel)),
            mirror,
            registries: RwLock::new(BTreeMap::new()),
            redirected: Mutex::new(BTreeSet::new()),
            listeners: bound.clone(),
            intercept: cfg.intercept.clone(),
            roots,
            counters: Counters::default(),
            guarded,
        });
        let targets = targets::targets(cfg.registries.iter(), &cfg.blob_hosts);
        shared.refresh(&targets).await;
        let mut tasks = Vec::new();
        for l in listeners {
            tasks.push(tokio::spawn(accept_loop(shared.clone(), l)));
        }
        let s = shared.clone();
        let every = (cfg.stale_after / 4).max(Duration::from_millis(10));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                s.with_kernel(|k| {
                    if let Err(e) = k.heartbeat() {
                        s.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                        warn!("heartbeat: {e}");
                    }
                });
            }
        }));
        let s = shared.clone();
        let refresh = cfg.refresh;
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(refresh).await;
                s.refresh(&targets).await;
            }
        }));
        info!(cgroup = %cgroup.display(), listeners = ?bound, intercept = cfg.intercept.is_some(), "transparent mode on");
        Ok(Self { shared, tasks })
    }

    /// Stops redirecting and detaches the programs (connections being served finish).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(k) = self.shared.kernel.lock().unwrap_or_else(|e| e.into_inner()).take() {
            drop(k);
            info!("transparent mode off: programs detached");
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The kernel's reason-coded counters and per-source UDP accounting, for metrics.
    pub fn metrics_source(&self) -> Arc<dyn crate::metrics::MetricsSource> {
        self.shared.clone()
    }

    /// Addresses currently redirected.
    pub fn redirected(&self) -> Vec<SocketAddr> {
        self.shared.redirected.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }
}

impl Drop for Transparent {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn with_kernel<T>(&self, f: impl FnOnce(&mut Kernel) -> T) -> Option<T> {
        self.kernel.lock().unwrap_or_else(|e| e.into_inner()).as_mut().map(f)
    }

    /// Resolves the targets again and brings the kernel's table in step.
    async fn refresh(&self, targets: &[targets::Target]) {
        let (by_addr, all, failures) = targets::resolve(targets).await;
        for f in &failures {
            warn!("resolving a registry host: {f}");
        }
        let old = self.redirected.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (add, remove) = targets::diff(&old, &all, !failures.is_empty());
        let mut now = old;
        for a in add {
            // The kernel rewrites to the listener of the same family.
            let Some(to) = self.listeners.iter().find(|l| l.is_ipv4() == a.is_ipv4()).copied() else {
                warn!(addr = %a, "no redirect listener of this address family; not redirected");
                continue;
            };
            match self.with_kernel(|k| k.set_redirect(a, to)) {
                Some(Ok(())) => {
                    info!(registry = %a, "redirecting");
                    now.insert(a);
                }
                Some(Err(e)) => warn!(addr = %a, "redirect table: {e}"),
                None => return,
            }
        }
        for a in remove {
            if let Some(Err(e)) = self.with_kernel(|k| k.remove_redirect(a)) {
                warn!(addr = %a, "redirect table: {e}");
            }
            info!(registry = %a, "no longer redirecting (gone from DNS)");
            now.remove(&a);
        }
        // Which registry each redirected address belongs to: this round's answers, and the
        // previous round's for addresses kept through a failed resolution.
        let mut regs = self.registries.write().unwrap_or_else(|e| e.into_inner());
        let kept: Vec<(SocketAddr, Registry)> = regs.iter().filter(|(a, _)| now.contains(a) && !by_addr.contains_key(a)).map(|(a, r)| (*a, r.clone())).collect();
        *regs = by_addr;
        regs.extend(kept);
        *self.redirected.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }
}

impl crate::metrics::MetricsSource for Shared {
    fn render(&self, r: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::{counter::Counter as PCounter, family::Family, gauge::Gauge};
        let kernel: Family<Vec<(String, String)>, PCounter> = Family::default();
        let peers: Family<Vec<(String, String)>, PCounter> = Family::default();
        let redirects = Gauge::<i64>::default();
        self.with_kernel(|k| {
            for (c, v) in k.counters() {
                kernel.get_or_create(&vec![("reason".into(), c.name().into())]).inc_by(v);
            }
            for (ip, s) in k.all_peer_stats() {
                let l = |dir: &str| vec![("source".to_string(), ip.to_string()), ("verdict".to_string(), dir.to_string())];
                peers.get_or_create(&l("passed")).inc_by(s.passed_bytes);
                peers.get_or_create(&l("dropped")).inc_by(s.dropped_bytes);
            }
        });
        let targets: Family<Vec<(String, String)>, Gauge> = Family::default();
        {
            let set = self.redirected.lock().unwrap_or_else(|e| e.into_inner());
            redirects.set(set.len() as i64);
            for a in set.iter() {
                targets.get_or_create(&vec![("endpoint".into(), a.to_string())]).set(1);
            }
        }
        r.register("redirect_target", "Each registry endpoint in the kernel's redirect table (value 1)", targets);
        r.register("kernel_events", "Kernel program decisions by reason (redirected, fail_open, exempt, xdp_dropped, ...)", kernel);
        r.register("guard_bytes", "Bytes to the agent's UDP ports per source, passed or dropped by the XDP guard", peers);
        r.register("redirected_endpoints", "Registry endpoints in the kernel's redirect table", redirects);
        let c = &self.counters;
        let conn: Family<Vec<(String, String)>, PCounter> = Family::default();
        for (name, v) in [
            ("http", &c.http),
            ("tls_intercepted", &c.tls_intercepted),
            ("tls_passthrough", &c.tls_passthrough),
            ("relayed_request", &c.relayed_requests),
            ("orig_dst_unknown", &c.orig_dst_unknown),
            ("relay_error", &c.relay_errors),
            ("tls_handshake_error", &c.tls_handshake_errors),
            ("heartbeat_error", &c.heartbeat_errors),
        ] {
            conn.get_or_create(&vec![("outcome".into(), name.into())]).inc_by(v.load(Ordering::Relaxed));
        }
        r.register("redirected_connections", "Redirected connections by outcome", conn);
        let g = Gauge::<i64>::default();
        g.set(self.guarded.len() as i64);
        r.register("guarded_interfaces", "Interfaces with the XDP guard attached", g);
    }
}

/// The cgroup v2 hierarchy's root: mounted one, or a fresh mount when there is none.
fn cgroup_root() -> Result<PathBuf, RedirectError> {
    if let Ok(p) = crate::bpf::cgroup2_mount() {
        return Ok(p);
    }
    let path = PathBuf::from("/run/peerd/cgroup2");
    std::fs::create_dir_all(&path).map_err(|source| RedirectError::Mount { path: path.clone(), source })?;
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let target = c(&path.to_string_lossy());
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(c("none").as_ptr(), target.as_ptr(), c("cgroup2").as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(RedirectError::Mount { path, source: std::io::Error::last_os_error() });
    }
    info!(path = %path.display(), "mounted cgroup2 (none was mounted)");
    Ok(path)
}

fn native_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        warn!("loading the system's CA certificates: {e}");
    }
    let (added, _) = roots.add_parsable_certificates(found.certs);
    debug!(added, "system CA certificates for relaying intercepted TLS");
    roots
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, peer) = crate::httpd::accept(&listener, |e| warn!("redirect listener: {e}")).await;
        let s = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = s.connection(stream, peer).await {
                debug!(%peer, "redirected connection ended: {e}");
            }
        });
    }
}

/// How long a client has to send its first bytes (a ClientHello or a request head).
const FIRST_BYTES: Duration = Duration::from_secs(10);

impl Shared {
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
        // Looked up while the client is connected: the kernel drops the entry when it closes.
        let Some(dst) = self.with_kernel(|k| k.original_destination(peer)).flatten() else {
            self.counters.orig_dst_unknown.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let registry = self.registries.read().unwrap_or_else(|e| e.into_inner()).get(&dst).cloned();
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(FIRST_BYTES, stream.peek(&mut first)).await.map_err(|_| timeout("first bytes"))??;
        if n == 0 {
            return Ok(());
        }
        if intercept::looks_like_tls(first[0]) {
            let intercept = match (&self.intercept, &registry) {
                (Some(ca), Some(reg)) if reg.url.scheme() == "https" => Some((ca.clone(), reg.clone())),
                _ => None,
            };
            let Some((ca, reg)) = intercept else {
                self.counters.tls_passthrough.fetch_add(1, Ordering::Relaxed);
                return self.relay_plain(stream, dst, &[]).await;
            };
            let name = match read_sni(&stream).await? {
                Sni::Name(n) => n,
                Sni::NoName => dst.ip().to_string(),
                Sni::NotTls | Sni::NeedMore => {
                    self.counters.tls_passthrough.fetch_add(1, Ordering::Relaxed);
                    return self.relay_plain(stream, dst, &[]).await;
                }
            };
            // Only the registry's own names: an address shared with other sites (a CDN) carries
            // their TLS too, which is none of our business.
            if !names_registry(&reg, &name) {
                self.counters.tls_passthrough.fetch_add(1, Ordering::Relaxed);
                return self.relay_plain(stream, dst, &[]).await;
            }
            let config = ca.server_config(&name).map_err(|e| std::io::Error::other(e.to_string()))?;
            let tls = match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
                Ok(t) => t,
                Err(e) => {
                    self.counters.tls_handshake_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            self.counters.tls_intercepted.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = self.mirror.serve_redirected(Stream::Tls(Box::new(tls)), peer, reg).await? {
                self.counters.relayed_requests.fetch_add(1, Ordering::Relaxed);
                return self.relay_tls(h, dst, &name).await;
            }
            return Ok(());
        }
        let Some(reg) = registry else {
            // A blob host spoken to in plain HTTP: nothing to serve, relay.
            return self.relay_plain(stream, dst, &[]).await;
        };
        self.counters.http.fetch_add(1, Ordering::Relaxed);
        if let Some(Handback { stream, unread }) = self.mirror.serve_redirected(Stream::Tcp(stream), peer, reg).await? {
            self.counters.relayed_requests.fetch_add(1, Ordering::Relaxed);
            if let Stream::Tcp(s) = stream {
                return self.relay_plain(s, dst, &unread).await;
            }
        }
        Ok(())
    }

    /// Connects to the original destination; a failure is counted as a relay error.
    async fn dial(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        relay::connect(dst).await.inspect_err(|_| {
            self.counters.relay_errors.fetch_add(1, Ordering::Relaxed);
        })
    }

    async fn relay_plain(&self, client: TcpStream, dst: SocketAddr, first: &[u8]) -> std::io::Result<()> {
        let up = self.dial(dst).await?;
        relay::splice_both(client, up, first).await.map(|_| ())
    }

    /// The rest of an intercepted connection, re-encrypted to the real registry (verified
    /// against the system's CAs under the name the client asked for).
    async fn relay_tls(&self, h: Handback, dst: SocketAddr, name: &str) -> std::io::Result<()> {
        let up = self.dial(dst).await?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
        let mut up = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server_name, up).await.inspect_err(|_| {
            self.counters.relay_errors.fetch_add(1, Ordering::Relaxed);
        })?;
        up.write_all(&h.unread).await?;
        let mut client = h.stream;
        tokio::io::copy_bidirectional(&mut client, &mut up).await.map(|_| ())
    }
}

/// Whether a TLS server name (or an address literal, when the client sent none) is one the
/// registry answers to: its API host or its name.
fn names_registry(reg: &Registry, name: &str) -> bool {
    let name = name.trim_end_matches('.').trim_matches(['[', ']']).to_ascii_lowercase();
    let host = |s: &str| targets::split_host_port(s, 0).map(|(h, _)| h);
    let api = reg.url.host_str().and_then(|h| host(h.trim_matches(['[', ']'])));
    Some(&name) == api.as_ref() || Some(&name) == host(&reg.name).as_ref()
}

/// Peeks until the ClientHello's SNI is known (bounded in time and size), leaving the bytes in
/// the socket for the TLS acceptor.
async fn read_sni(stream: &TcpStream) -> std::io::Result<Sni> {
    let mut buf = vec![0u8; intercept::MAX_CLIENT_HELLO];
    let deadline = tokio::time::Instant::now() + FIRST_BYTES;
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await.map_err(|_| timeout("ClientHello"))??;
        match intercept::client_hello_sni(&buf[..n]) {
            Sni::NeedMore if n == 0 || n == buf.len() => return Ok(Sni::NotTls),
            Sni::NeedMore => {
                if n == last {
                    // peek returns at once while nothing new has arrived: wait for more.
                    stream.readable().await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                last = n;
            }
            other => return Ok(other),
        }
    }
}

fn timeout(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no {what} within {FIRST_BYTES:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::Registries;

    #[test]
    fn intercepts_only_the_registrys_own_names() {
        let regs = Registries::new(&["docker.io=https://registry-1.docker.io", "10.0.0.5:5000=https://10.0.0.5:5000", "[2001:db8::5]:443=https://[2001:db8::5]"], false).unwrap();
        let r = |n: &str| regs.resolve(Some(n), None).unwrap().clone();
        assert!(names_registry(&r("docker.io"), "registry-1.docker.io"));
        assert!(names_registry(&r("docker.io"), "Registry-1.Docker.io."));
        assert!(names_registry(&r("docker.io"), "docker.io"));
        assert!(!names_registry(&r("docker.io"), "www.example.com"));
        assert!(names_registry(&r("10.0.0.5:5000"), "10.0.0.5"));
        assert!(!names_registry(&r("10.0.0.5:5000"), "10.0.0.6"));
        assert!(names_registry(&r("[2001:db8::5]:443"), "2001:db8::5"));
    }
}
