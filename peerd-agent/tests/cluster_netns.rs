//! Four nodes in network namespaces behind a shaped bridge (the same code as `cargo xtask
//! cluster`), a real registry in its own namespace: every node pulls the same blobs at once, all
//! get correct bytes, the registry serves each blob once; a killed agent does not stop the rest.
mod support;

use std::process::Command;

use support::*;
use xtask::components::Proc;
use xtask::netcluster::{Deployment, NetCluster, Spec, QUEUE_MS};

fn spec(prefix: &str, nodes: usize) -> Spec {
    Spec { nodes, rate_mbit: 1000, registry_rate_mbit: 1000, delay_ms: 0, queue_ms: QUEUE_MS, small_first: false, prefix: prefix.into() }
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
    // With the flags a user passes, piece data went over the bulk channel (TLS on TCP between
    // the namespaces), and no piece request had to fall back to QUIC.
    let (mut bulk, mut fallbacks) = (0, 0);
    for node in c.nodes.iter().take(4) {
        let out = Command::new("ip").args(["netns", "exec", &node.ns, "curl", "-s", "--max-time", "5", "http://127.0.0.1:30000/metrics"]).output().unwrap();
        let metrics = String::from_utf8_lossy(&out.stdout);
        bulk += metric_value(&metrics, "peerd_peer_bulk_requests_total").unwrap_or(0);
        fallbacks += metric_value(&metrics, "peerd_peer_bulk_fallbacks_total").unwrap_or(0);
        // `peerd status` says so too.
        let out = Command::new("ip").args(["netns", "exec", &node.ns, "curl", "-s", "--max-time", "5", "http://127.0.0.1:30000/status"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        assert_eq!(v.pointer("/peer_data/transport").and_then(|t| t.as_str()), Some("tcp"), "{}: {v}", node.ns);
        assert_eq!(v.pointer("/peer_data/listening").and_then(|t| t.as_bool()), Some(true), "{}: {v}", node.ns);
    }
    assert!(bulk > 0, "no piece request went over the bulk channel");
    assert_eq!(fallbacks, 0, "piece requests fell back to QUIC");
}

#[test]
fn a_killed_agent_does_not_stop_the_other_nodes() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    // Shaped the other way bench swarm can (HTB, small packets first), so that path runs here too.
    let c = NetCluster::up(Spec { rate_mbit: 200, small_first: true, ..spec(&format!("pt{}b", std::process::id() % 10000), 4) });
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
    // Wait (bounded) until every node sees the other three alive: owners are chosen from this view.
    eventually(&c, &[0, 1, 2, 3], "membership", |i, v| alive(v, &me(&c, i)).len() == 3);
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
    // A later reader finds holders through gossip's content summaries: every node's status
    // shows each peer advertising the blobs it pulled (bounded wait).
    let want = image.blobs.len() as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for node in c.nodes.iter().take(4) {
        loop {
            let out = Command::new("ip").args(["netns", "exec", &node.ns, "curl", "-s", "--max-time", "2", "http://127.0.0.1:30000/status"]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            let counts: Vec<Option<u64>> = v["peers"].as_array().map(|a| a.iter().map(|p| p.pointer("/advertised/complete").and_then(|x| x.as_u64())).collect()).unwrap_or_default();
            if counts.len() == 3 && counts.iter().all(|c| *c == Some(want)) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{}: peers advertise {counts:?}, want {want} complete blobs each", node.ns);
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    let log = d.agents[0].as_ref().unwrap().log_text();
    assert!(!log.contains("gossip could not start"), "{log}");
    // Each node's newly complete blobs went out as rumors (a handful of changes, not a bulk
    // set) over the real sealed sockets, and arrived decodable. Whether a rumor or chitchat's
    // own exchange brings a change first is a race in a 4-node cluster (both run every 100 ms;
    // the simulator measures rumors at scale), so arrivals count whether new or already known.
    let mut arrived = 0;
    for (i, node) in c.nodes.iter().enumerate().take(4) {
        let out = Command::new("ip").args(["netns", "exec", &node.ns, "curl", "-s", "--max-time", "5", "http://127.0.0.1:30000/metrics"]).output().unwrap();
        let metrics = String::from_utf8_lossy(&out.stdout);
        let rumors = |event: &str| metric_value(&metrics, &format!("peerd_gossip_rumors_total{{event=\"{event}\"}}")).unwrap_or(0);
        assert!(rumors("published") > 0, "node {i} published no rumor:\n{metrics}");
        assert_eq!(rumors("undecodable"), 0, "node {i}");
        arrived += rumors("received_new") + rumors("received_stale");
    }
    assert!(arrived > 0, "no rumor arrived anywhere");
}

/// The agent's status in `ns` (Null when it does not answer).
fn status(ns: &str) -> serde_json::Value {
    let out = Command::new("ip").args(["netns", "exec", ns, "curl", "-s", "--max-time", "2", "http://127.0.0.1:30000/status"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// The gossip view of the agent in `ns`: (advertised address, state) of every peer it lists.
/// Nodes are told apart by the address they found for themselves: the harness gives them no
/// ids or addresses, as a user would not.
fn view(ns: &str) -> Vec<(String, String)> {
    status(ns)["peers"]
        .as_array()
        .map(|a| a.iter().map(|p| (p["addr"].as_str().unwrap_or("").to_string(), p["state"].as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

/// Node i's peer address as peers should see it.
fn me(c: &NetCluster, i: usize) -> String {
    format!("{}:{}", c.nodes[i].ip, xtask::netcluster::PEER_PORT)
}

fn alive(v: &[(String, String)], me: &str) -> Vec<String> {
    let mut a: Vec<String> = v.iter().filter(|(id, st)| st == "alive" && id != me).map(|(id, _)| id.clone()).collect();
    a.sort();
    a
}

/// Polls (bounded) until `cond` holds for every listed node's view.
fn eventually(c: &NetCluster, nodes: &[usize], what: &str, cond: impl Fn(usize, &[(String, String)]) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let bad: Vec<usize> = nodes.iter().copied().filter(|&i| !cond(i, &view(&c.nodes[i].ns))).collect();
        if bad.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: not true on nodes {bad:?}: {:?}", view(&c.nodes[bad[0]].ns));
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
fn gossip_membership_detects_death_heals_partitions_and_ignores_outsiders() {
    require("curl");
    let dir = tempfile::tempdir().unwrap();
    // 8 members and one outsider (node 8) that shares the DNS name but not the secret.
    let c = NetCluster::up(spec(&format!("pt{}d", std::process::id() % 10000), 9));
    let mut d = Deployment::start_with(&c, peerd(), dir.path(), &[], xtask::netcluster::Discovery::Gossip);
    if let Some(mut a) = d.agents[8].take() {
        a.kill();
    }
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, b"not the cluster's secret at all, 32+").unwrap();
    let n8 = &c.nodes[8];
    let mut outsider = Proc::spawn(
        Command::new("ip").args(["netns", "exec", &n8.ns]).arg(peerd()).args(["agent", "--data-dir"]).arg(dir.path().join("outsider")).args([
            "--mirror-addr",
            "0.0.0.0:30000",
            "--seed",
            &format!("{}:30001", xtask::netcluster::SEED_NAME),
            "--no-default-registries",
        ]).arg("--cluster-secret-file").arg(&wrong),
        dir.path().join("outsider.log"),
    );
    let members: Vec<usize> = (0..8).collect();
    let all = |except: &[usize]| -> Vec<String> {
        let mut v: Vec<String> = (0..8).filter(|i| !except.contains(i)).map(|i| me(&c, i)).collect();
        v.sort();
        v
    };
    // 1. Everyone agrees on the 8 members; the outsider never appears and sees no one.
    eventually(&c, &members, "membership", |i, v| alive(v, &me(&c, i)) == all(&[i]));
    // The killed member 8 and the outsider share an address: tell them apart by id.
    let outsider_id = status(&n8.ns)["self_check"]["node_id"].as_str().unwrap_or("").to_string();
    assert!(!outsider_id.is_empty(), "the outsider's status has no node id");
    for i in members.clone() {
        let ids: Vec<String> = status(&c.nodes[i].ns)["peers"].as_array().map(|a| a.iter().map(|p| p["id"].as_str().unwrap_or("").to_string()).collect()).unwrap_or_default();
        assert!(!ids.contains(&outsider_id), "the outsider got into node {i}'s view: {ids:?}");
    }
    assert!(alive(&view(&n8.ns), &me(&c, 8)).is_empty(), "the outsider learned the members: {:?}", view(&n8.ns));
    // Every namespace shares this host's name, as cloned VMs do: the ids still differ, each
    // node advertises its own address (found from the route to the seed), and says so.
    let mut ids: Vec<String> = members.iter().map(|&i| status(&c.nodes[i].ns)["self_check"]["node_id"].as_str().unwrap_or("").to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "node ids collide: {ids:?}");
    for &i in &members {
        let sc = &status(&c.nodes[i].ns)["self_check"];
        assert_eq!(sc["advertised"].as_str(), Some(me(&c, i).as_str()), "node {i}: {sc}");
        assert_eq!(sc["warnings"].as_array().map(Vec::len), Some(0), "node {i}: {sc}");
    }
    // One image pulled by all eight at once: each blob leaves the registry once.
    let reg = d.registry_addr.to_string();
    let image = Image::build(dir.path(), &[("big.bin", 8 << 20), ("small.bin", 3000)]);
    push(&c, &image, &reg);
    let before = d.registry_blob_gets().len();
    for digest in &image.blobs {
        for (i, r) in pull_everywhere(&c, &reg, digest, &members).into_iter().enumerate() {
            assert_eq!(r.unwrap_or_else(|e| panic!("node {i}: {e}")), digest[7..]);
        }
    }
    let gets = d.registry_blob_gets()[before..].to_vec();
    for digest in &image.blobs {
        let n = gets.iter().filter(|l| l.contains(digest.as_str())).count();
        assert_eq!(n, 1, "{digest} fetched {n} times for 8 nodes: {gets:?}");
    }
    // 2. A killed node is detected.
    if let Some(mut a) = d.agents[7].take() {
        a.kill();
    }
    let live: Vec<usize> = (0..7).collect();
    eventually(&c, &live, "node7 detected dead", |i, v| alive(v, &me(&c, i)) == all(&[i, 7]));
    // 3. A partition (node 6's link down) is detected and heals.
    let sw_if = c.nodes[6].sw_if.clone();
    run(Command::new("ip").args(["-n", &c.switch, "link", "set", &sw_if, "down"]));
    let rest: Vec<usize> = (0..6).collect();
    eventually(&c, &rest, "node6 cut off", |i, v| alive(v, &me(&c, i)) == all(&[i, 6, 7]));
    run(Command::new("ip").args(["-n", &c.switch, "link", "set", &sw_if, "up"]));
    eventually(&c, &live, "partition healed", |i, v| alive(v, &me(&c, i)) == all(&[i, 7]));
    outsider.kill();
}
