//! `bench redirect`: what transparent mode costs and gains on one node, side by side in one run.
//! containerd's `ctr content fetch` of one image (no unpack, so only transfer is timed), as:
//! (a) direct: from the registry over the node's shaped link, no agent in the way;
//! (b) hosts.toml: the agent's mirror named in hosts.toml, blobs cached by the agent;
//! (c) redirected: no configuration, the kernel redirects the registry connection to the agent,
//!     blobs cached. (c)/(b) is the price of the redirect path; (c)/(a) what a node sees.
//! Cases interleave in rounds so they share the machine's noise. The multi-tenant access check
//! stays on (a HEAD upstream per repository and credential, cached for --auth-ttl).
use std::{path::Path, process::Command, time::Instant};

use anyhow::{bail, Result};
use xtask::{
    cgroup::Cgroup,
    components::{command_in, Containerd, Image},
    netcluster::{Deployment, NetCluster, Options, Spec, QUEUE_MS},
};

use crate::results::record;

pub fn redirect(layers_mib: &[u64], rounds: usize, rate: u32) -> Result<()> {
    crate::build(true)?;
    let peerd = crate::target_dir().join("release/peerd");
    let tmp = std::env::temp_dir().join(format!("peerd-bench-redirect-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = run(&peerd, &tmp, layers_mib, rounds, rate);
    let _ = std::fs::remove_dir_all(&tmp);
    let table = result?;
    print!("{table}");
    record("Transparent mode: redirected vs direct pull on one node", &table)
}

fn run(peerd: &Path, dir: &Path, layers_mib: &[u64], rounds: usize, rate: u32) -> Result<String> {
    let c = NetCluster::up(Spec { nodes: 1, rate_mbit: rate, registry_rate_mbit: rate, delay_ms: 0, queue_ms: QUEUE_MS, small_first: false, prefix: format!("rb{}", std::process::id() % 10000) });
    let node = Cgroup::create("rbnode");
    let outside = Cgroup::create("rbplain");
    let opts = Options {
        extra_per_node: vec![vec!["--cgroup-root".into(), node.root.display().to_string(), "--cgroup".into(), node.name()]],
        agent_cgroups: vec![&node],
        ..Options::default()
    };
    let d = Deployment::start_opts(&c, peerd, dir, &["--transparent"], opts);
    let ctd_dir = dir.join("ctd");
    std::fs::create_dir_all(&ctd_dir)?;
    let ctd = Containerd::start_in(&ctd_dir, Some(&c.nodes[0].ns), Some(&node));
    let files: Vec<(String, usize)> = layers_mib.iter().enumerate().map(|(i, m)| (format!("l{i}.bin"), (*m as usize) << 20)).collect();
    let spec: Vec<(&str, usize)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let image = Image::build_with(dir, &spec, true);
    image.push_to(Some(&c.registry.ns), &d.registry_host, "bench");
    let reference = format!("{}/bench:{}", d.registry_host, image.tag);
    ctd.mirror(&d.registry_host, "127.0.0.1:30000".parse()?);
    let total: u64 = image.blobs.iter().map(|b| image.blob_bytes(b).len() as u64).sum();

    // The three ways in; (a) and (b) run from a cgroup without the programs.
    let fetch = |case: usize| -> Result<f64> {
        let procs = if case == 2 { node.procs_path() } else { outside.procs_path() };
        let mut cmd: Command = command_in("ctr", Some(&c.nodes[0].ns), Some(&procs));
        cmd.arg("--address").arg(&ctd.sock).args(["content", "fetch", "--plain-http"]);
        if case == 1 {
            cmd.arg("--hosts-dir").arg(&ctd.hosts);
        }
        cmd.arg(&reference);
        ctd.forget(&reference);
        let t = Instant::now();
        let out = cmd.output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("ctr content fetch (case {case}): {}", String::from_utf8_lossy(&out.stderr));
        }
        for b in &image.blobs {
            if xtask::components::sha256_hex(&ctd.content(b)) != b[7..] {
                bail!("case {case}: containerd holds wrong bytes for {b}");
            }
        }
        Ok(secs)
    };
    // Fill the agent's cache once (through the redirect), then measure.
    fetch(2)?;
    let before = d.registry_blob_gets().len();
    let mut times: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds {
        for (case, t) in times.iter_mut().enumerate() {
            t.push(fetch(case)?);
        }
    }
    let gets = d.registry_blob_gets()[before..].to_vec();
    let from_containerd = gets.iter().filter(|l| l.contains("containerd/")).count();
    let from_agent = gets.len() - from_containerd;
    if from_agent != 0 {
        bail!("the agent fetched blobs from the registry during the cached rounds: {gets:?}");
    }
    if from_containerd != rounds * image.blobs.len() {
        bail!("expected {} direct blob GETs, the registry logged {from_containerd}", rounds * image.blobs.len());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let m: Vec<f64> = times.iter_mut().map(med).collect();
    let mut out = format!(
        "One image of {} blobs, {:.1} MiB in all (pseudo-random layers {layers_mib:?} MiB), node and registry links {rate} Mbit/s (tbf), `ctr content fetch` (no unpack), median of {rounds} interleaved rounds; the agent's cache warm for (b) and (c). The registry logged only containerd's GETs in the measured rounds (direct case), none by the agent.\n\n",
        image.blobs.len(),
        total as f64 / 1048576.0
    );
    out.push_str("| case | median s | min s | max s | vs direct | vs hosts.toml |\n|---|---|---|---|---|---|\n");
    for (i, name) in ["(a) direct from the registry", "(b) agent via hosts.toml (cached)", "(c) agent via eBPF redirect (cached)"].iter().enumerate() {
        let v = &times[i];
        out.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.2}x | {:.2}x |\n",
            m[i],
            v[0],
            v[v.len() - 1],
            m[i] / m[0],
            m[i] / m[1]
        ));
    }
    Ok(out)
}
