//! Four nodes in network namespaces behind a shaped bridge (the same code as `cargo xtask
//! cluster`), a real registry in its own namespace: every node pulls the same blobs at once, all
//! get correct bytes, the registry serves each blob once; a killed agent does not stop the rest.
mod support;

use std::process::Command;

use support::*;
use xtask::netcluster::{Deployment, NetCluster, Spec};

fn spec(prefix: &str, nodes: usize) -> Spec {
    Spec { nodes, rate_mbit: 1000, registry_rate_mbit: 1000, delay_ms: 0, prefix: prefix.into() }
}

/// curl inside a node's namespace; returns the body's sha256 or the error.
fn fetch_in(ns: &str, url: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "bash", "-c", &format!("set -o pipefail; curl -sSf --max-time 60 '{url}' | sha256sum")])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string())
}

fn push(c: &NetCluster, image: &Image, reg: &str) {
    run(Command::new("ip").args(["netns", "exec", &c.nodes[0].ns, "skopeo", "copy", "--dest-tls-verify=false"]).args([
        format!("oci:{}:{}", image.layout.display(), image.tag),
        format!("docker://{reg}/app:v1"),
    ]));
}

fn pull_everywhere(c: &NetCluster, reg: &str, digest: &str, nodes: &[usize]) -> Vec<Result<String, String>> {
    let handles: Vec<_> = nodes
        .iter()
        .map(|&i| {
            let ns = c.nodes[i].ns.clone();
            let url = format!("http://127.0.0.1:30000/v2/app/blobs/{digest}?ns={reg}");
            std::thread::spawn(move || fetch_in(&ns, &url))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn four_namespaced_nodes_pull_at_once_and_the_registry_serves_each_blob_once() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    let c = NetCluster::up(spec(&format!("pt{}a", std::process::id() % 10000), 4));
    let d = Deployment::start(&c, peerd(), dir.path(), &["--trust-cluster"]);
    let reg = d.registry_addr.to_string();
    let image = Image::build(dir.path(), &[("big.bin", 16 << 20), ("small.bin", 2000)]);
    push(&c, &image, &reg);
    let before = d.registry_blob_gets().len();
    for digest in &image.blobs {
        for (i, r) in pull_everywhere(&c, &reg, digest, &[0, 1, 2, 3]).into_iter().enumerate() {
            assert_eq!(r.unwrap_or_else(|e| panic!("node {i}: {e}")), digest[7..], "node {i} blob {digest}");
        }
    }
    let gets = d.registry_blob_gets()[before..].to_vec();
    for digest in &image.blobs {
        let n = gets.iter().filter(|l| l.contains(digest.as_str())).count();
        assert_eq!(n, 1, "{digest} fetched {n} times for 4 nodes: {gets:?}");
    }
}

#[test]
fn a_killed_agent_does_not_stop_the_other_nodes() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    let c = NetCluster::up(Spec { rate_mbit: 200, ..spec(&format!("pt{}b", std::process::id() % 10000), 4) });
    let mut d = Deployment::start(&c, peerd(), dir.path(), &["--trust-cluster"]);
    let reg = d.registry_addr.to_string();
    let image = Image::build(dir.path(), &[("big.bin", 24 << 20)]);
    push(&c, &image, &reg);
    let layer = image.blobs.last().unwrap().clone();
    // Node 0 gets it first; then nodes 1-3 fetch (from node 0 among others) while node 0 dies.
    assert_eq!(pull_everywhere(&c, &reg, &layer, &[0])[0].as_deref(), Ok(&layer[7..]));
    let ns: Vec<String> = (1..4).map(|i| c.nodes[i].ns.clone()).collect();
    let url = format!("http://127.0.0.1:30000/v2/app/blobs/{layer}?ns={reg}");
    let handles: Vec<_> = ns.into_iter().map(|n| { let u = url.clone(); std::thread::spawn(move || fetch_in(&n, &u)) }).collect();
    std::thread::sleep(std::time::Duration::from_millis(400));
    if let Some(mut a) = d.agents[0].take() {
        a.kill();
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap().unwrap_or_else(|e| panic!("node {}: {e}", i + 1)), layer[7..]);
    }
}

#[test]
fn gossip_from_one_dns_name_then_each_blob_once() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    let c = NetCluster::up(spec(&format!("pt{}c", std::process::id() % 10000), 4));
    let d = Deployment::start_with(&c, peerd(), dir.path(), &["--trust-cluster"], xtask::netcluster::Discovery::Gossip);
    let reg = d.registry_addr.to_string();
    let image = Image::build(dir.path(), &[("big.bin", 8 << 20)]);
    push(&c, &image, &reg);
    // Membership converges within a few 100 ms gossip rounds; give it a bounded moment.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let before = d.registry_blob_gets().len();
    for digest in &image.blobs {
        for (i, r) in pull_everywhere(&c, &reg, digest, &[0, 1, 2, 3]).into_iter().enumerate() {
            assert_eq!(r.unwrap_or_else(|e| panic!("node {i}: {e}")), digest[7..]);
        }
    }
    let gets = d.registry_blob_gets()[before..].to_vec();
    for digest in &image.blobs {
        let n = gets.iter().filter(|l| l.contains(digest.as_str())).count();
        assert_eq!(n, 1, "{digest} fetched {n} times (gossip membership should agree on one owner): {gets:?}");
    }
    // A later reader finds holders through gossip's content summaries (advertised each second).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let log = d.agents[0].as_ref().unwrap().log_text();
    assert!(!log.contains("gossip could not start"), "{log}");
}
