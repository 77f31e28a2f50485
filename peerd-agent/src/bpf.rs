//! The one place that loads and attaches peerd's kernel programs and talks to their maps.
//!
//! The programs (crate `peerd-ebpf`) are embedded in the binary. [`Kernel`] owns them: dropping it
//! detaches everything (links are released with their file descriptors).
//!
//! Kernel log: the programs log each decision through aya-log (see `peerd-ebpf/src/main.rs`), off
//! unless the agent's log filter enables debug (or trace) for [`LOG_TARGET`], e.g.
//! `RUST_LOG=info,peerd_agent::bpf=debug`. The level is fixed at load time ([`KernelLog`]); when on,
//! a thread forwards the records to `tracing` under that target.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramInfo, SockOps, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use aya_log::EbpfLogger;
use peerd_common::{maps, programs, Config, Counter, Endpoint, PeerStats};

/// The kernel object, built by `cargo xtask build`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PEERD_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the kernel programs failed (needs root or CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN): {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {0} missing from the kernel object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the kernel object")]
    MissingProgram(&'static str),
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); mount one with `mount -t cgroup2 none DIR` and pass it")]
    NoCgroup2,
    #[error("socket cookie: {0}")]
    Cookie(std::io::Error),
    #[error("prefix length {len} is too long for {ip}")]
    BadPrefix { ip: IpAddr, len: u8 },
    #[error("kernel log (aya-log): {0}")]
    Log(#[from] aya_log::Error),
    #[error("starting the kernel log reader: {0}")]
    LogThread(std::io::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> BpfError {
    move |source| BpfError::Program { name, source }
}

/// Converts a socket address to the kernel's endpoint form (IPv4 and IPv4-mapped IPv6 alike).
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    let port = addr.port().to_be();
    match canonical_ip(addr.ip()) {
        IpAddr::V4(v4) => Endpoint::v4(u32::from_ne_bytes(v4.octets()), port),
        IpAddr::V6(v6) => Endpoint::v6(ip6_words(&v6), port),
    }
}

/// The inverse of [`endpoint`].
pub fn socket_addr(e: &Endpoint) -> SocketAddr {
    let port = u16::from_be(e.port);
    if e.is_v4() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(e.ip[3].to_ne_bytes())), port)
    } else {
        let mut b = [0u8; 16];
        for (i, w) in e.ip.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port)
    }
}

/// IPv4-mapped IPv6 as plain IPv4: the one form the kernel maps and the agent compare.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn ip6_words(v6: &Ipv6Addr) -> [u32; 4] {
    let o = v6.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]))
}

fn ip_words(ip: IpAddr) -> [u32; 4] {
    endpoint(SocketAddr::new(ip, 0)).ip
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel's socket cookie (`SO_COOKIE`), the identity the programs see.
pub fn socket_cookie(fd: impl AsFd) -> Result<u64, BpfError> {
    sockopt_u64(fd, libc::SO_COOKIE).map_err(BpfError::Cookie)
}

/// A u64 socket option of SOL_SOCKET (SO_COOKIE, SO_NETNS_COOKIE).
fn sockopt_u64(fd: impl AsFd, opt: libc::c_int) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: fd is a live socket; v/len point to properly sized storage.
    let rc = unsafe { libc::getsockopt(fd.as_fd().as_raw_fd(), libc::SOL_SOCKET, opt, (&mut v as *mut u64).cast(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Finds the first mounted cgroup v2 hierarchy (pure v2 at /sys/fs/cgroup, or hybrid's
/// /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<PathBuf, BpfError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| BpfError::Cgroup {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    // Fields: id parent major:minor root mountpoint opts ... - fstype source superopts
    info.lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .ok_or(BpfError::NoCgroup2)
}

/// The `tracing` target of the kernel programs' log records.
pub const LOG_TARGET: &str = "peerd_agent::bpf";

/// How much the kernel programs log, fixed when they are loaded (aya-log's `AYA_LOG_LEVEL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelLog {
    /// The programs skip every log call (the verifier removes them): no cost on connect().
    Off,
    /// Each decision: redirected, exempt, bypassed, other_netns, fail_open, family_mismatch,
    /// orig_dst_missing, xdp_dropped. One ring-buffer record per redirect-table hit.
    Debug,
    /// Also per-packet xdp_passed and per-connection orig_dst_recorded/closed.
    Trace,
}

impl KernelLog {
    /// What the current `tracing` subscriber's filter wants for [`LOG_TARGET`]: off unless it
    /// enables debug or trace there.
    pub fn from_tracing() -> Self {
        if tracing::enabled!(target: LOG_TARGET, tracing::Level::TRACE) {
            KernelLog::Trace
        } else if tracing::enabled!(target: LOG_TARGET, tracing::Level::DEBUG) {
            KernelLog::Debug
        } else {
            KernelLog::Off
        }
    }

    /// The value of `AYA_LOG_LEVEL`: calls at this level or more severe run, 0 none.
    fn level(self) -> u8 {
        match self {
            KernelLog::Off => 0,
            KernelLog::Debug => aya_log::Level::Debug as u8,
            KernelLog::Trace => aya_log::Level::Trace as u8,
        }
    }
}

/// Forwards aya-log records to `tracing` under [`LOG_TARGET`] (the program's module in `program`).
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let program = r.target();
        // tracing's level is part of the call site, hence one call per level.
        match r.level() {
            log::Level::Error => tracing::error!(target: LOG_TARGET, program, "{}", r.args()),
            log::Level::Warn => tracing::warn!(target: LOG_TARGET, program, "{}", r.args()),
            log::Level::Info => tracing::info!(target: LOG_TARGET, program, "{}", r.args()),
            log::Level::Debug => tracing::debug!(target: LOG_TARGET, program, "{}", r.args()),
            log::Level::Trace => tracing::trace!(target: LOG_TARGET, program, "{}", r.args()),
        }
    }

    fn flush(&self) {}
}

/// The thread reading the programs' log ring buffer; told to stop when dropped (it exits within
/// one drain interval, after a last read).
struct LogReader {
    stop: Arc<AtomicBool>,
}

impl LogReader {
    fn start(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        let mut logger = EbpfLogger::init_with_logger(ebpf, ToTracing)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Records go to the subscriber of whoever loaded the programs (a test's scoped one too).
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        std::thread::Builder::new()
            .name("peerd-bpf-log".into())
            .spawn(move || tracing::dispatcher::with_default(&dispatch, || read_log(&mut logger, &flag)))
            .map_err(BpfError::LogThread)?;
        Ok(LogReader { stop })
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How often the reader drains the ring buffer. A timer, not poll(): a reader blocked in poll()
/// is woken by every record (the submit in the program queues a wakeup when the consumer has
/// caught up), which on a loaded 2-core node put a context switch on each redirected connect().
/// Drained every 10 ms (100 idle wakeups a second), the 128 KiB buffer takes some 50k records a
/// second before it drops any.
const LOG_DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

fn read_log(logger: &mut EbpfLogger<ToTracing>, stop: &AtomicBool) {
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        // aya-log panics on a record it cannot parse; that ends the reader, not the agent.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
            tracing::warn!(target: LOG_TARGET, "unreadable kernel log record; kernel log reader stopped");
            return;
        }
        if stopping {
            return;
        }
        std::thread::sleep(LOG_DRAIN_INTERVAL);
    }
}

/// Loaded kernel programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    redirects: HashMap<MapData, Endpoint, Endpoint>,
    config: Array<MapData, Config>,
    bypass: Mutex<HashMap<MapData, u64, u8>>,
    exempt: HashMap<MapData, u32, u8>,
    orig_dst: HashMap<MapData, Endpoint, Endpoint>,
    counters: PerCpuArray<MapData, u64>,
    guarded_ports: HashMap<MapData, u16, u8>,
    allowed: LpmTrie<MapData, [u32; 4], u8>,
    peer_stats: PerCpuHashMap<MapData, [u32; 4], PeerStats>,
    stale_after_ns: u64,
    netns_cookie: u64,
    /// Present while the programs log (not [`KernelLog::Off`]).
    _log: Option<LogReader>,
}

impl Kernel {
    /// Loads the embedded programs into the kernel (not yet attached anywhere), logging as the
    /// `tracing` filter asks ([`KernelLog::from_tracing`]).
    pub fn load() -> Result<Self, BpfError> {
        Self::load_object(OBJECT, KernelLog::from_tracing())
    }

    /// Loads the embedded programs with an explicit log level.
    pub fn load_with(log: KernelLog) -> Result<Self, BpfError> {
        Self::load_object(OBJECT, log)
    }

    /// Loads programs from an object file's bytes (tests use this to load a modified object).
    pub fn load_object(object: &[u8], log: KernelLog) -> Result<Self, BpfError> {
        let level = log.level();
        // aya-log's gate, a .rodata global (its default is every level). Any object with log
        // calls has it; one without (an older build) logs nothing, so only "on" requires it.
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, log != KernelLog::Off)
            .load(object)?;
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
            ebpf.take_map(name).ok_or(BpfError::MissingMap(name))
        }
        macro_rules! typed {
            ($name:expr) => {
                take(&mut ebpf, $name)?.try_into().map_err(map_err($name))?
            };
        }
        let mut kernel = Kernel {
            redirects: typed!(maps::REDIRECTS),
            config: typed!(maps::CONFIG),
            bypass: Mutex::new(typed!(maps::BYPASS)),
            exempt: typed!(maps::EXEMPT),
            orig_dst: typed!(maps::ORIG_DST),
            counters: typed!(maps::COUNTERS),
            guarded_ports: typed!(maps::GUARDED_PORTS),
            allowed: typed!(maps::ALLOWED),
            peer_stats: typed!(maps::PEER_STATS),
            stale_after_ns: peerd_common::DEFAULT_STALE_AFTER_NS,
            netns_cookie: 0,
            _log: None,
            ebpf,
        };
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let p: &mut CgroupSockAddr = kernel.program(name)?;
            p.load().map_err(prog_err(name))?;
        }
        let p: &mut SockOps = kernel.program(programs::SOCK_OPS)?;
        p.load().map_err(prog_err(programs::SOCK_OPS))?;
        let p: &mut Xdp = kernel.program(programs::XDP_GUARD)?;
        p.load().map_err(prog_err(programs::XDP_GUARD))?;
        if log != KernelLog::Off {
            kernel._log = Some(LogReader::start(&mut kernel.ebpf)?);
        }
        Ok(kernel)
    }

    /// The kernel's view of a loaded program (id, verified instruction count, translated size).
    pub fn program_info(&self, name: &'static str) -> Result<ProgramInfo, BpfError> {
        let p = self.ebpf.program(name).ok_or(BpfError::MissingProgram(name))?;
        p.info().map_err(prog_err(name))
    }

    fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, BpfError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let p = self.ebpf.program_mut(name).ok_or(BpfError::MissingProgram(name))?;
        p.try_into().map_err(prog_err(name))
    }

    /// Attaches connect4, connect6 and sock_ops to a cgroup v2 directory; every process in it (and
    /// below it) is subject to the redirect table.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let dir = File::open(cgroup).map_err(|source| BpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let p: &mut CgroupSockAddr = self.program(name)?;
            p.attach(&dir, CgroupAttachMode::Single).map_err(prog_err(name))?;
        }
        let p: &mut SockOps = self.program(programs::SOCK_OPS)?;
        p.attach(&dir, CgroupAttachMode::Single)
            .map_err(prog_err(programs::SOCK_OPS))?;
        Ok(())
    }

    /// Attaches the XDP guard to an interface of the calling thread's network namespace.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<(), BpfError> {
        let p: &mut Xdp = self.program(programs::XDP_GUARD)?;
        p.attach(iface, mode).map_err(prog_err(programs::XDP_GUARD))?;
        Ok(())
    }

    /// Redirects TCP connections to `registry` towards `agent`.
    pub fn set_redirect(&mut self, registry: SocketAddr, agent: SocketAddr) -> Result<(), BpfError> {
        self.redirects
            .insert(endpoint(registry), endpoint(agent), 0)
            .map_err(map_err(maps::REDIRECTS))
    }

    pub fn remove_redirect(&mut self, registry: SocketAddr) -> Result<(), BpfError> {
        self.redirects
            .remove(&endpoint(registry))
            .map_err(map_err(maps::REDIRECTS))
    }

    /// Sets the fail-open bound: redirects stop this long after the last [`Kernel::heartbeat`].
    pub fn set_stale_after(&mut self, bound: std::time::Duration) -> Result<(), BpfError> {
        self.stale_after_ns = bound.as_nanos() as u64;
        let cfg = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        self.write_config(Config { stale_after_ns: self.stale_after_ns, ..cfg })
    }

    /// Redirects only connect() calls made in the network namespace of `socket` (the agent's:
    /// the rewrite target, 127.0.0.1, means the caller's own loopback). Unset: every namespace.
    pub fn set_netns_of(&mut self, socket: impl AsFd) -> Result<u64, BpfError> {
        let cookie = sockopt_u64(socket, libc::SO_NETNS_COOKIE).map_err(BpfError::Cookie)?;
        self.netns_cookie = cookie;
        let cfg = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        self.write_config(Config { netns_cookie: cookie, ..cfg })?;
        Ok(cookie)
    }

    /// Proves the agent is alive; redirects are only active within the bound of the last call.
    pub fn heartbeat(&mut self) -> Result<(), BpfError> {
        self.write_config(Config {
            heartbeat_ns: monotonic_ns(),
            stale_after_ns: self.stale_after_ns,
            netns_cookie: self.netns_cookie,
        })
    }

    fn write_config(&mut self, cfg: Config) -> Result<(), BpfError> {
        self.config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))
    }

    /// The original destination of a redirected connection, looked up by the peer address of the
    /// socket the agent accepted (the client's local address).
    pub fn original_destination(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.orig_dst.get(&endpoint(client), 0).ok().map(|e| socket_addr(&e))
    }

    /// Number of tracked redirected connections (for tests and metrics).
    pub fn tracked_connections(&self) -> usize {
        self.orig_dst.keys().filter(|k| k.is_ok()).count()
    }

    /// Exempts a not-yet-connected socket from redirection (the agent's own upstream sockets).
    /// The entry lives until the returned guard is dropped, which should be right after connect().
    pub fn bypass(&self, socket: impl AsFd) -> Result<BypassGuard<'_>, BpfError> {
        let cookie = socket_cookie(socket)?;
        self.bypass_cookie(cookie)?;
        Ok(BypassGuard { kernel: self, cookie })
    }

    /// As [`Kernel::bypass`] for a cookie obtained elsewhere; pair with [`Kernel::unbypass_cookie`].
    pub fn bypass_cookie(&self, cookie: u64) -> Result<(), BpfError> {
        let mut map = self.bypass.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(cookie, 1, 0).map_err(map_err(maps::BYPASS))
    }

    pub fn unbypass_cookie(&self, cookie: u64) {
        let mut map = self.bypass.lock().unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(&cookie);
    }

    /// Exempts the calling process from redirection: every connection it makes, from any thread,
    /// goes where it was addressed. The kernel records the process itself (it knows the PID in the
    /// root namespace, which an agent in a pod does not): a socket marked for registration connects
    /// to `listener` (a local TCP listener), through a temporary redirect entry so the program sees
    /// it. Returns the recorded PID, or `None` when the programs did not see the connect because
    /// this process is outside the attached cgroup (and so needs no exemption).
    pub fn exempt_self(&mut self, listener: SocketAddr) -> Result<Option<u32>, BpfError> {
        let before: Vec<u32> = self.exempt.keys().filter_map(Result::ok).collect();
        self.set_redirect(listener, listener)?;
        let result = self.register_connect(listener);
        let _ = self.remove_redirect(listener);
        result?;
        Ok(self.exempt.keys().filter_map(Result::ok).find(|k| !before.contains(k)))
    }

    fn register_connect(&self, to: SocketAddr) -> Result<(), BpfError> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).map_err(BpfError::Cookie)?;
        let cookie = socket_cookie(&socket)?;
        {
            let mut map = self.bypass.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(cookie, peerd_common::BYPASS_REGISTER, 0).map_err(map_err(maps::BYPASS))?;
        }
        let connected = socket.connect(&to.into());
        self.unbypass_cookie(cookie);
        connected.map_err(BpfError::Cookie)
    }

    /// Sums a reason-coded counter over all CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// All counters, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL.iter().map(|&c| (c, self.counter(c))).collect()
    }

    /// Guards a UDP port with the XDP program (accounting and allow-list).
    pub fn guard_port(&mut self, port: u16) -> Result<(), BpfError> {
        self.guarded_ports
            .insert(port, 1, 0)
            .map_err(map_err(maps::GUARDED_PORTS))
    }

    /// Allows sources in `ip/len` to reach guarded ports.
    pub fn allow_prefix(&mut self, ip: IpAddr, len: u8) -> Result<(), BpfError> {
        let ip = canonical_ip(ip);
        let (max, offset) = if ip.is_ipv4() { (32, 96) } else { (128, 0) };
        if len > max {
            return Err(BpfError::BadPrefix { ip, len });
        }
        self.allowed
            .insert(&Key::new(offset + len as u32, ip_words(ip)), 1, 0)
            .map_err(map_err(maps::ALLOWED))
    }

    /// Traffic seen on guarded ports from one source, summed over CPUs.
    pub fn peer_stats(&self, source: IpAddr) -> Option<PeerStats> {
        let v = self.peer_stats.get(&ip_words(canonical_ip(source)), 0).ok()?;
        Some(v.iter().fold(PeerStats::default(), |a, s| PeerStats {
            passed_packets: a.passed_packets + s.passed_packets,
            passed_bytes: a.passed_bytes + s.passed_bytes,
            dropped_packets: a.dropped_packets + s.dropped_packets,
            dropped_bytes: a.dropped_bytes + s.dropped_bytes,
        }))
    }
}

impl Kernel {
    /// Every source seen on guarded ports, with its traffic summed over CPUs.
    pub fn all_peer_stats(&self) -> Vec<(IpAddr, PeerStats)> {
        self.peer_stats
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let ip = socket_addr(&Endpoint { ip: k, port: 0, _pad: 0 }).ip();
                self.peer_stats(ip).map(|s| (ip, s))
            })
            .collect()
    }
}

/// Removes a socket's bypass entry when dropped.
pub struct BypassGuard<'a> {
    kernel: &'a Kernel,
    cookie: u64,
}

impl Drop for BypassGuard<'_> {
    fn drop(&mut self) {
        self.kernel.unbypass_cookie(self.cookie);
    }
}

/// Size of the embedded kernel object (for `peerd version`).
pub fn object_len() -> usize {
    OBJECT.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips() {
        for s in ["10.1.2.3:5000", "[2001:db8::1]:443", "[::ffff:10.0.0.1]:80", "127.0.0.1:30000"] {
            let a: SocketAddr = s.parse().unwrap();
            let back = socket_addr(&endpoint(a));
            assert_eq!(back.port(), a.port());
            assert_eq!(canonical_ip(back.ip()), canonical_ip(a.ip()));
        }
        assert!(endpoint("1.2.3.4:1".parse().unwrap()).is_v4());
        assert_eq!(
            endpoint("[::ffff:1.2.3.4]:1".parse().unwrap()),
            endpoint("1.2.3.4:1".parse().unwrap())
        );
    }

    #[test]
    fn finds_a_cgroup2_mount_or_says_why() {
        match cgroup2_mount() {
            Ok(p) => assert!(p.join("cgroup.procs").exists(), "{p:?}"),
            Err(e) => assert!(matches!(e, BpfError::NoCgroup2)),
        }
    }
}
