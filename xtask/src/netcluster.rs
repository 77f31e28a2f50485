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

use crate::components::{run, Proc};

/// Shape of the cluster.
#[derive(Clone, Debug)]
pub struct Spec {
    pub nodes: usize,
    /// Per-node link rate in Mbit/s, both directions.
    pub rate_mbit: u32,
    /// The registry's uplink rate in Mbit/s.
    pub registry_rate_mbit: u32,
    pub delay_ms: u32,
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

fn tbf(ns: &str, dev: &str, mbit: u32) {
    // burst sized for ~1 ms at the rate, at least 64 KiB; latency bounds the queue.
    let burst = ((mbit as u64 * 1_000_000 / 8) / 1000).max(64 << 10);
    run(Command::new("ip").args(["netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf"]).args([
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst.to_string(),
        "latency",
        "50ms",
    ]));
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
        tbf(&ns, "eth0", mbit);
        tbf(&self.switch, &sw_if, mbit);
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

/// Agents (and a registry) running inside a NetCluster.
pub struct Deployment {
    pub registry: Proc,
    pub dns: Option<Proc>,
    /// /etc/netns/<ns> directories made for the nodes' resolv.conf (removed on drop).
    pub netns_etc: Vec<PathBuf>,
    pub registry_addr: SocketAddr,
    pub agents: Vec<Option<Proc>>,
    pub mirror_port: u16,
    pub dir: PathBuf,
}

pub const MIRROR_PORT: u16 = 30000;
pub const PEER_PORT: u16 = 30002;

impl Deployment {
    /// Starts docker-registry in the registry namespace and one agent per node, every agent
    /// knowing every other (static peers), sharing a cluster secret.
    pub fn start(c: &NetCluster, peerd: &Path, dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(c, peerd, dir, extra, Discovery::Static)
    }

    pub fn start_with(c: &NetCluster, peerd: &Path, dir: &Path, extra: &[&str], discovery: Discovery) -> Self {
        crate::components::require("docker-registry");
        let reg_addr: SocketAddr = SocketAddr::new(c.registry.ip.into(), 5000);
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  accesslog:\n    disabled: false\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {reg_addr}\n",
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
        let (mut dns, mut netns_etc) = (None, Vec::new());
        if discovery == Discovery::Gossip {
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
            // `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
            for n in &c.nodes {
                let etc = PathBuf::from("/etc/netns").join(&n.ns);
                std::fs::create_dir_all(&etc).expect("/etc/netns");
                std::fs::write(etc.join("resolv.conf"), format!("nameserver {}\n", c.registry.ip)).expect("resolv.conf");
                netns_etc.push(etc);
            }
        }
        let mut agents = Vec::new();
        for (i, n) in c.nodes.iter().enumerate() {
            let data = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&data).expect("node dir");
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &n.ns]).arg(peerd).arg("agent");
            cmd.arg("--data-dir").arg(&data);
            cmd.args(["--mirror-addr", &format!("0.0.0.0:{MIRROR_PORT}")]);
            cmd.args(["--peer-addr", &format!("{}:{PEER_PORT}", n.ip)]);
            cmd.args(["--node-id", &format!("node{i}")]);
            cmd.arg("--cluster-secret-file").arg(&secret);
            cmd.args(["--no-default-registries", "--registry", &format!("{reg_addr}=http://{reg_addr}")]);
            cmd.args(["--cache-size", "4GiB"]);
            match discovery {
                Discovery::Static => {
                    for p in &peers {
                        cmd.args(["--peer", p]);
                    }
                }
                Discovery::Gossip => {
                    cmd.args(["--seed", &format!("{SEED_NAME}:{GOSSIP_PORT}"), "--gossip-addr", &format!("{}:{GOSSIP_PORT}", n.ip)]);
                }
            }
            cmd.args(extra);
            cmd.env("RUST_LOG", "info");
            let mut proc = Proc::spawn(&mut cmd, dir.join(format!("agent{i}.log")));
            wait_in(&n.ns, SocketAddr::new(n.ip.into(), MIRROR_PORT), &mut proc);
            agents.push(Some(proc));
        }
        Self { registry, dns, netns_etc, registry_addr: reg_addr, agents, mirror_port: MIRROR_PORT, dir: dir.to_owned() }
    }

    /// Access-log lines of blob GETs at the registry.
    pub fn registry_blob_gets(&self) -> Vec<String> {
        std::thread::sleep(std::time::Duration::from_millis(250));
        self.registry.log_text().lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")).map(str::to_owned).collect()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
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
