//! A multi-node cluster on one machine: one network namespace per node, one for the registry, all
//! joined by a bridge inside a "switch" namespace, every link shaped with tc in both directions
//! (a node can neither upload nor download faster than its link). Addresses come from the
//! benchmark range 198.18.0.0/15 and exist only inside these namespaces. `cargo xtask cluster`,
//! the multi-node tests and `bench swarm` all build clusters with this code.
//!
//! Latency: this kernel has no netem qdisc, so added delay cannot be emulated here; `delay_ms`
//! is recorded and refused if non-zero (the deterministic simulation models latency instead).
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    cgroup::Cgroup,
    components::{command_in, run, Proc, TestCa},
};

/// Shape of the cluster.
#[derive(Clone, Debug)]
pub struct Spec {
    pub nodes: usize,
    /// Per-node link rate in Mbit/s, both directions.
    pub rate_mbit: u32,
    /// The registry's uplink rate in Mbit/s.
    pub registry_rate_mbit: u32,
    pub delay_ms: u32,
    /// Each shaped link's queue, in milliseconds at its rate (tbf `latency`). `QUEUE_MS` models a
    /// deep FIFO buffer; real nodes' default qdisc (fq_codel, fq) keeps queues near 5 ms and
    /// separates flows, which this kernel cannot emulate (no fq_codel, sfq or prio here);
    /// `small_first` models the part that matters most here, ACKs not waiting behind bulk data.
    pub queue_ms: u32,
    /// Packets under 128 bytes (TCP ACKs, QUIC ACK-only packets) leave a link before bulk data
    /// (HTB with a u32 filter): the part of a real node's fq_codel this kernel can model (its
    /// sparse flows go first). Off: one FIFO per link, as the main tables use.
    pub small_first: bool,
    /// Prefix of namespace and interface names (short: interface names are limited to 15 bytes).
    pub prefix: String,
}

pub struct Node {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The switch-side veth end (shaped: the node's download).
    pub sw_if: String,
}

/// Namespaces, links and shaping; removed on drop (processes in them are the caller's).
pub struct NetCluster {
    pub spec: Spec,
    pub switch: String,
    pub nodes: Vec<Node>,
    pub registry: Node,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Default `Spec::queue_ms`.
pub const QUEUE_MS: u32 = 50;

/// A shaper's burst: ~1 ms at the rate, at least 64 KiB.
fn burst_bytes(mbit: u32) -> u64 {
    ((mbit as u64 * 1_000_000 / 8) / 1000).max(64 << 10)
}

fn tbf(ns: &str, dev: &str, mbit: u32, queue_ms: u32) {
    // Latency bounds the queue.
    let burst = burst_bytes(mbit);
    run(Command::new("ip").args(["netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf"]).args([
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst.to_string(),
        "latency",
        &format!("{queue_ms}ms"),
    ]));
}

/// `tbf`'s rate and queue with packets under 128 bytes first (`Spec::small_first`): an HTB class
/// for small packets (prio 0) and one for the rest (a byte FIFO of `queue_ms`), sharing the rate.
fn htb_small_first(ns: &str, dev: &str, mbit: u32, queue_ms: u32) {
    let tc = |args: &[&str]| run(Command::new("ip").args(["netns", "exec", ns, "tc"]).args(args));
    let rate = format!("{mbit}mbit");
    let burst = burst_bytes(mbit).to_string();
    let limit = (mbit as u64 * 1_000_000 / 8 * queue_ms as u64 / 1000).max(64 << 10).to_string();
    let _ = Command::new("ip").args(["netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"]).output();
    tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20"]);
    tc(&["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &rate, "ceil", &rate, "burst", &burst, "cburst", &burst]);
    let small_mbit = (mbit / 10).max(1);
    let small = format!("{small_mbit}mbit");
    let bulk = format!("{}mbit", mbit - small_mbit);
    tc(&["class", "add", "dev", dev, "parent", "1:1", "classid", "1:10", "htb", "rate", &small, "ceil", &rate, "burst", &burst, "prio", "0"]);
    tc(&["class", "add", "dev", dev, "parent", "1:1", "classid", "1:20", "htb", "rate", &bulk, "ceil", &rate, "burst", &burst, "prio", "1"]);
    tc(&["qdisc", "add", "dev", dev, "parent", "1:10", "pfifo", "limit", "1000"]);
    tc(&["qdisc", "add", "dev", dev, "parent", "1:20", "bfifo", "limit", &limit]);
    // IPv4 total length (bytes 2-3) below 128.
    tc(&["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "u16", "0x0000", "0xff80", "at", "2", "flowid", "1:10"]);
}

impl NetCluster {
    pub fn up(spec: Spec) -> Self {
        assert!(spec.delay_ms == 0, "added latency needs tc netem, which this kernel lacks; use --delay 0 (see the module docs)");
        assert!(spec.nodes >= 1 && spec.nodes <= 200, "1..=200 nodes");
        let p = &spec.prefix;
        let switch = format!("{p}sw");
        // Leftovers from a crashed run with the same prefix go first.
        Self::remove_namespaces(p);
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        let mut c = NetCluster { spec: spec.clone(), switch, nodes: Vec::new(), registry: Node { ns: String::new(), ip: Ipv4Addr::UNSPECIFIED, sw_if: String::new() } };
        c.registry = c.add_node("reg", Ipv4Addr::new(198, 18, 255, 1), spec.registry_rate_mbit);
        for i in 0..spec.nodes {
            let ipaddr = Ipv4Addr::new(198, 18, (1 + i / 250) as u8, (1 + i % 250) as u8);
            let n = c.add_node(&format!("n{i}"), ipaddr, spec.rate_mbit);
            c.nodes.push(n);
        }
        c
    }

    fn add_node(&mut self, name: &str, addr: Ipv4Addr, mbit: u32) -> Node {
        let p = &self.spec.prefix;
        let ns = format!("{p}{name}");
        let sw_if = format!("{p}{name}s");
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &sw_if, "netns", &self.switch]);
        ip(&["-n", &self.switch, "link", "set", &sw_if, "master", "br0"]);
        ip(&["-n", &self.switch, "link", "set", &sw_if, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/15"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        // Upload (node -> switch) and download (switch -> node).
        let shape = if self.spec.small_first { htb_small_first } else { tbf };
        shape(&ns, "eth0", mbit, self.spec.queue_ms);
        shape(&self.switch, &sw_if, mbit, self.spec.queue_ms);
        Node { ns, ip: addr, sw_if }
    }

    /// Runs a command inside a node's namespace (`ip netns exec`).
    pub fn exec(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Bytes the registry has sent on its link so far (tc counters of its uplink).
    pub fn registry_tx_bytes(&self) -> u64 {
        let out = run(Command::new("ip").args(["-n", &self.registry.ns, "-s", "link", "show", "eth0"]));
        // "TX:  bytes packets ..." then the numbers on the next line.
        let mut lines = out.lines();
        while let Some(l) = lines.next() {
            if l.trim_start().starts_with("TX:") {
                return lines.next().and_then(|n| n.split_whitespace().next()).and_then(|b| b.parse().ok()).unwrap_or(0);
            }
        }
        0
    }

    fn remove_namespaces(prefix: &str) {
        let list = Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(prefix) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        Self::remove_namespaces(&self.spec.prefix);
    }
}

/// How agents find each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// Every agent gets every other's address (`--peer`).
    Static,
    /// Gossip, seeded from one DNS name (served by dnsmasq in the registry namespace) that
    /// resolves to every node, as a headless Service would.
    Gossip,
}

/// The DNS name gossip seeds from in `Discovery::Gossip`.
pub const SEED_NAME: &str = "peerd-seeds.cluster.test";
pub const GOSSIP_PORT: u16 = 30001;

/// What `Deployment::start_opts` sets up besides registry and agents in their defaults.
pub struct Options<'a> {
    pub discovery: Discovery,
    /// Serve the registry over HTTPS with a certificate of this CA (for its IP and
    /// `registry_name`); the agents then get `SSL_CERT_FILE` pointing at the CA.
    pub registry_tls: Option<&'a TestCa>,
    /// A DNS name for the registry, resolvable in every node's namespace (an
    /// `/etc/netns/<ns>/hosts` that `ip netns exec` mounts over /etc/hosts); `registry_host`,
    /// `registry_url` and the agents' `--registry` then use it instead of the IP.
    pub registry_name: Option<String>,
    /// Start the agents now (false: only record how, for `start_agent` later; and tests of the
    /// harness itself need no peerd binary).
    pub start_agents: bool,
    /// Arguments for node i's agent after the shared `extra` (e.g. `--cgroup <node cgroup>`).
    pub extra_per_node: Vec<Vec<String>>,
    /// If not empty, agent i runs in cgroup i (one per node).
    pub agent_cgroups: Vec<&'a Cgroup>,
    /// Environment for every agent (after the defaults `RUST_LOG=info` and, with TLS,
    /// `SSL_CERT_FILE`, which these override).
    pub agent_env: Vec<(String, String)>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            discovery: Discovery::Static,
            registry_tls: None,
            registry_name: None,
            start_agents: true,
            extra_per_node: Vec::new(),
            agent_cgroups: Vec::new(),
            agent_env: Vec::new(),
        }
    }
}

/// /etc/netns/<ns> directories, removed on drop.
struct EtcGuard(Vec<PathBuf>);

impl Drop for EtcGuard {
    fn drop(&mut self) {
        for e in &self.0 {
            let _ = std::fs::remove_dir_all(e);
        }
    }
}

/// How one agent is started, kept to start it again the same way after `kill_agent`.
struct AgentLaunch {
    ns: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cgroup_procs: Option<PathBuf>,
    /// Where it listens once up (its mirror).
    addr: SocketAddr,
    starts: u32,
}

/// Agents (and a registry) running inside a NetCluster.
pub struct Deployment {
    pub registry: Proc,
    pub dns: Option<Proc>,
    /// /etc/netns/<ns> directories made for the nodes' resolv.conf and hosts (removed on drop).
    pub netns_etc: Vec<PathBuf>,
    pub registry_addr: SocketAddr,
    /// The registry as image references name it: `<registry_name or IP>:5000`.
    pub registry_host: String,
    /// `http://<registry_host>` or `https://<registry_host>`.
    pub registry_url: String,
    /// Agent i (None while not running).
    pub agents: Vec<Option<Proc>>,
    pub mirror_port: u16,
    pub dir: PathBuf,
    launches: Vec<AgentLaunch>,
}

pub const MIRROR_PORT: u16 = 30000;
pub const PEER_PORT: u16 = 30002;
pub const REGISTRY_PORT: u16 = 5000;

impl Deployment {
    /// Starts docker-registry in the registry namespace and one agent per node, every agent
    /// knowing every other (static peers), sharing a cluster secret.
    pub fn start(c: &NetCluster, peerd: &Path, dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(c, peerd, dir, extra, Discovery::Static)
    }

    pub fn start_with(c: &NetCluster, peerd: &Path, dir: &Path, extra: &[&str], discovery: Discovery) -> Self {
        Self::start_opts(c, peerd, dir, extra, Options { discovery, ..Options::default() })
    }

    /// The general form: `extra` goes to every agent, the rest is in `opts`.
    pub fn start_opts(c: &NetCluster, peerd: &Path, dir: &Path, extra: &[&str], opts: Options<'_>) -> Self {
        crate::components::require("docker-registry");
        assert!(opts.agent_cgroups.is_empty() || opts.agent_cgroups.len() == c.nodes.len(), "agent_cgroups: one per node");
        let reg_addr: SocketAddr = SocketAddr::new(c.registry.ip.into(), REGISTRY_PORT);
        let registry_host = format!("{}:{REGISTRY_PORT}", opts.registry_name.as_deref().map_or(c.registry.ip.to_string(), str::to_owned));
        let scheme = if opts.registry_tls.is_some() { "https" } else { "http" };
        let registry_url = format!("{scheme}://{registry_host}");

        // Files `ip netns exec` mounts over /etc/<file>: written before anything starts there.
        let mut etc: Vec<(&str, &str, String)> = Vec::new();
        if let Some(name) = &opts.registry_name {
            // Replaces /etc/hosts entirely, so localhost is listed again.
            let hosts = format!("127.0.0.1 localhost\n::1 localhost ip6-localhost\n{} {name}\n", c.registry.ip);
            for n in c.nodes.iter().chain([&c.registry]) {
                etc.push((&n.ns, "hosts", hosts.clone()));
            }
        }
        if opts.discovery == Discovery::Gossip {
            for n in &c.nodes {
                etc.push((&n.ns, "resolv.conf", format!("nameserver {}\n", c.registry.ip)));
            }
        }
        // Removed by this guard if anything below panics, by Deployment's drop otherwise.
        let mut netns_etc = EtcGuard(Vec::new());
        for (ns, file, text) in etc {
            let d = PathBuf::from("/etc/netns").join(ns);
            if !netns_etc.0.contains(&d) {
                netns_etc.0.push(d.clone());
            }
            std::fs::create_dir_all(&d).expect("/etc/netns");
            std::fs::write(d.join(file), text).expect("/etc/netns file");
        }

        let mut tls = String::new();
        // PEERD_BENCH_TRACE: per-piece swarm events in the agents' logs (diagnostics).
        let level = if std::env::var_os("PEERD_BENCH_TRACE").is_some() { "info,peerd_agent::transfer::trace=debug" } else { "info" };
        let mut agent_env = vec![("RUST_LOG".to_string(), level.to_string())];
        if let Some(ca) = opts.registry_tls {
            let (crt, key) = ca.issue(opts.registry_name.as_deref().unwrap_or("registry"), &[c.registry.ip.into()]);
            tls = format!("  tls:\n    certificate: {}\n    key: {}\n", crt.display(), key.display());
            agent_env.push(("SSL_CERT_FILE".into(), ca.ca_pem_path.display().to_string()));
        }
        agent_env.extend(opts.agent_env.iter().cloned());
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  accesslog:\n    disabled: false\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {reg_addr}\n{tls}",
                dir.join("registry-data").display()
            ),
        )
        .expect("write registry config");
        let mut registry = Proc::spawn(
            Command::new("ip").args(["netns", "exec", &c.registry.ns, "docker-registry", "serve"]).arg(&cfg),
            dir.join("registry.log"),
        );
        wait_in(&c.registry.ns, reg_addr, &mut registry);
        let secret = dir.join("cluster-secret");
        std::fs::write(&secret, b"netcluster test secret, 32 bytes!").expect("secret");
        let peers: Vec<String> = c.nodes.iter().map(|n| format!("{}:{PEER_PORT}", n.ip)).collect();
        let mut dns = None;
        if opts.discovery == Discovery::Gossip {
            crate::components::require("dnsmasq");
            let hosts = dir.join("seed-hosts");
            let lines: String = c.nodes.iter().map(|n| format!("{} {SEED_NAME}\n", n.ip)).collect();
            std::fs::write(&hosts, lines).expect("hosts file");
            let mut p = Proc::spawn(
                Command::new("ip").args(["netns", "exec", &c.registry.ns, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-daemon", "--port=53"]).arg(format!("--listen-address={}", c.registry.ip)).arg("--bind-interfaces").arg(format!("--addn-hosts={}", hosts.display())).arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display())),
                dir.join("dnsmasq.log"),
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
            if let Some(st) = p.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten()) {
                panic!("dnsmasq exited ({st}): {}", p.log_text());
            }
            dns = Some(p);
        }
        let mut launches = Vec::new();
        for (i, n) in c.nodes.iter().enumerate() {
            let data = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&data).expect("node dir");
            let mut args: Vec<String> = vec!["agent".into(), "--data-dir".into(), data.display().to_string()];
            let mut arg = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
            // Only what a user passes: the peer and gossip endpoints keep their defaults
            // (wildcard listeners; the agent finds the address to advertise), node ids are the
            // agents' own (every namespace shares this host's name).
            arg(&["--mirror-addr", &format!("0.0.0.0:{MIRROR_PORT}")]);
            arg(&["--cluster-secret-file", &secret.display().to_string()]);
            arg(&["--no-default-registries", "--registry", &format!("{registry_host}={registry_url}")]);
            arg(&["--cache-size", "4GiB"]);
            match opts.discovery {
                Discovery::Static => {
                    for p in &peers {
                        arg(&["--peer", p]);
                    }
                }
                Discovery::Gossip => {
                    arg(&["--seed", &format!("{SEED_NAME}:{GOSSIP_PORT}")]);
                }
            }
            arg(extra);
            args.extend(opts.extra_per_node.get(i).cloned().unwrap_or_default());
            launches.push(AgentLaunch {
                ns: n.ns.clone(),
                program: peerd.to_owned(),
                args,
                env: agent_env.clone(),
                cgroup_procs: opts.agent_cgroups.get(i).map(|cg| cg.procs_path()),
                addr: SocketAddr::new(n.ip.into(), MIRROR_PORT),
                starts: 0,
            });
        }
        let mut d = Self {
            registry,
            dns,
            netns_etc: std::mem::take(&mut netns_etc.0),
            registry_addr: reg_addr,
            registry_host,
            registry_url,
            agents: c.nodes.iter().map(|_| None).collect(),
            mirror_port: MIRROR_PORT,
            dir: dir.to_owned(),
            launches,
        };
        if opts.start_agents {
            for i in 0..c.nodes.len() {
                d.start_agent(i);
            }
        }
        d
    }

    /// Starts node i's agent with the command line, environment and cgroup it was deployed
    /// with, and waits (bounded) until its mirror listens. Logs: `agent<i>.log`, then
    /// `agent<i>.<n>.log` for the n-th restart (earlier logs are kept).
    pub fn start_agent(&mut self, i: usize) {
        assert!(self.agents[i].is_none(), "agent {i} is already running");
        let l = &mut self.launches[i];
        let mut cmd = command_in(&l.program, Some(&l.ns), l.cgroup_procs.as_deref());
        cmd.args(&l.args).envs(l.env.iter().map(|(k, v)| (k, v)));
        let log = match l.starts {
            0 => self.dir.join(format!("agent{i}.log")),
            n => self.dir.join(format!("agent{i}.{n}.log")),
        };
        l.starts += 1;
        let mut proc = Proc::spawn(&mut cmd, log);
        wait_in(&l.ns, l.addr, &mut proc);
        self.agents[i] = Some(proc);
    }

    /// SIGKILLs node i's agent (a crash: no chance to clean up) and reaps it; no-op if it is
    /// not running.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            a.kill();
        }
    }

    /// SIGTERMs node i's agent (an orderly stop) and waits for it, at most `within`, then
    /// SIGKILLs it. Returns its exit status, None if it had to be killed or was not running.
    pub fn stop_agent(&mut self, i: usize, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut a = self.agents[i].take()?;
        let child = a.child.as_mut()?;
        // SAFETY: kill(2) on our own child, not yet reaped (so the pid is still its).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                a.child = None;
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        a.kill();
        None
    }

    /// The full command line node i's agent is (re)started with, after the program.
    pub fn agent_args(&self, i: usize) -> &[String] {
        &self.launches[i].args
    }

    /// Access-log lines of blob GETs at the registry.
    pub fn registry_blob_gets(&self) -> Vec<String> {
        std::thread::sleep(std::time::Duration::from_millis(250));
        self.registry.log_text().lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")).map(str::to_owned).collect()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows every agent's view of what went wrong.
            for (i, a) in self.agents.iter().enumerate() {
                if let Some(a) = a {
                    let text = a.log_text();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(40)..];
                    eprintln!("---- agent {i} (log {}), last {} lines ----\n{}", a.log.display(), tail.len(), tail.join("\n"));
                }
            }
        }
        for a in self.agents.iter_mut().flatten() {
            a.kill();
        }
        self.registry.kill();
        if let Some(d) = &mut self.dns {
            d.kill();
        }
        for e in &self.netns_etc {
            let _ = std::fs::remove_dir_all(e);
        }
    }
}

/// Waits until `addr` accepts TCP connections from inside `ns` (bounded), or fails with the log.
fn wait_in(ns: &str, addr: SocketAddr, proc: &mut Proc) {
    for _ in 0..200 {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "bash", "-c", &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port())])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        if let Some(st) = proc.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("process exited ({st}) before listening on {addr}: {}", proc.log_text());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing listening on {addr} in {ns}: {}", proc.log_text());
}
