//! `cargo xtask cluster up|down`: the same namespaced cluster the tests and `bench swarm` use,
//! left running for a person to poke at. State (namespace prefix, PIDs, directory) is kept in
//! /run/peerd-xtask-cluster so `down` can remove exactly what `up` made.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use xtask::netcluster::{Deployment, NetCluster, Spec, MIRROR_PORT, QUEUE_MS};

const STATE: &str = "/run/peerd-xtask-cluster";
const PREFIX: &str = "pdx";

#[derive(Subcommand)]
pub enum Action {
    /// Build N node namespaces + a registry namespace, shaped links, one agent per node.
    Up {
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// Per-node link rate, Mbit/s, both directions.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// The registry's uplink, Mbit/s.
        #[arg(long, default_value_t = 200)]
        registry_rate: u32,
        /// Added latency in ms: not supported on kernels without netem (refused if non-zero).
        #[arg(long, default_value_t = 0)]
        delay: u32,
        /// Run release builds of the agent.
        #[arg(long)]
        release: bool,
    },
    /// Stop the agents and the registry and remove every namespace `up` made.
    Down,
}

pub fn run(a: Action) -> Result<()> {
    match a {
        Action::Up { nodes, rate, registry_rate, delay, release } => up(nodes, rate, registry_rate, delay, release),
        Action::Down => down(),
    }
}

fn up(nodes: usize, rate: u32, registry_rate: u32, delay: u32, release: bool) -> Result<()> {
    if std::path::Path::new(STATE).exists() {
        bail!("a cluster is already up ({STATE}); run `cargo xtask cluster down` first");
    }
    if delay != 0 {
        bail!("--delay needs the netem qdisc, which this kernel does not have; use --delay 0");
    }
    crate::build(release)?;
    let dir = PathBuf::from("/var/tmp/peerd-xtask-cluster");
    std::fs::create_dir_all(&dir)?;
    let c = NetCluster::up(Spec { nodes, rate_mbit: rate, registry_rate_mbit: registry_rate, delay_ms: 0, queue_ms: QUEUE_MS, small_first: false, prefix: PREFIX.into() });
    let bin = crate::target_dir().join(if release { "release/peerd" } else { "debug/peerd" });
    let d = Deployment::start(&c, &bin, &dir, &[]);
    let mut pids = vec![d.registry.pid()];
    pids.extend(d.agents.iter().flatten().map(|p| p.pid()));
    std::fs::write(STATE, format!("{}\n{}\n", dir.display(), pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")))?;
    println!("cluster up: {nodes} nodes at {rate} Mbit/s, registry {} (uplink {registry_rate} Mbit/s)", d.registry_addr);
    for n in &c.nodes {
        println!("  {}  {}  mirror http://127.0.0.1:{MIRROR_PORT} inside the namespace", n.ns, n.ip);
    }
    println!("try: ip netns exec {} curl -s http://127.0.0.1:{MIRROR_PORT}/v2/", c.nodes[0].ns);
    println!("logs in {}; remove with `cargo xtask cluster down`", dir.display());
    // Leave everything running: `down` removes it using the state file.
    std::mem::forget(d);
    std::mem::forget(c);
    Ok(())
}

fn down() -> Result<()> {
    let state = std::fs::read_to_string(STATE).context("no cluster is up (no state file)")?;
    let mut lines = state.lines();
    let dir = lines.next().unwrap_or_default().to_string();
    for pid in lines.next().unwrap_or_default().split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        // SAFETY: kill on PIDs this tool started and recorded.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let list = std::process::Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(PREFIX) {
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if dir.starts_with("/var/tmp/peerd-xtask-cluster") {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::remove_file(STATE)?;
    println!("cluster down");
    Ok(())
}
