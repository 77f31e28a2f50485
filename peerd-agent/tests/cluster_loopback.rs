//! Several agents on one machine (loopback, static peers) in front of a real registry: the
//! registry sees each blob once for the whole cluster, even when every node asks at once.
mod support;

use std::{net::SocketAddr, time::Duration};

use support::*;

struct Cluster {
    agents: Vec<Agent>,
}

fn cluster(dir: &std::path::Path, n: usize, reg: &str, extra: &[&str]) -> Cluster {
    let peer_addrs: Vec<SocketAddr> = (0..n).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    std::fs::write(dir.join("secret"), b"cluster secret for the loopback test").unwrap();
    let secret = dir.join("secret").display().to_string();
    let mut agents = Vec::new();
    for (i, me) in peer_addrs.iter().enumerate() {
        let d = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut args: Vec<String> = vec!["--peer-addr".into(), me.to_string(), "--cluster-secret-file".into(), secret.clone(), "--node-id".into(), format!("node{i}")];
        for p in &peer_addrs {
            args.push("--peer".into());
            args.push(p.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        agents.push(Agent::start(peerd(), &d, &[format!("{reg}=http://{reg}")], &args));
    }
    Cluster { agents }
}

async fn get_all(c: &Cluster, path: &str) -> Vec<Result<Vec<u8>, String>> {
    let client = http_client();
    let futs: Vec<_> = c
        .agents
        .iter()
        .map(|a| {
            let req = client.get(a.url(path)).timeout(Duration::from_secs(60));
            async move {
                let r = req.send().await.map_err(|e| e.to_string())?;
                if r.status() != 200 {
                    return Err(format!("status {}", r.status()));
                }
                r.bytes().await.map(|b| b.to_vec()).map_err(|e| e.to_string())
            }
        })
        .collect();
    futures_join(futs).await
}

async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(futs: Vec<F>) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_at_once_fetch_each_blob_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build(dir.path(), &[("big.bin", 12 << 20), ("small.bin", 4096)]);
    image.push(&registry, "app");
    let reg = registry.name();
    let c = cluster(dir.path(), 4, &reg, &["--trust-cluster"]);
    let before = registry.blob_gets().len();
    for d in &image.blobs {
        let results = get_all(&c, &format!("/v2/app/blobs/{d}?ns={reg}")).await;
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.unwrap_or_else(|e| panic!("node {i}: {e}")), image.blob_bytes(d), "node {i}, blob {d}");
        }
    }
    let gets = &registry.blob_gets()[before..];
    for d in &image.blobs {
        let n = gets.iter().filter(|l| l.contains(d.as_str())).count();
        assert_eq!(n, 1, "blob {d} fetched {n} times from the registry for 4 nodes: {gets:?}");
    }
    // Later reads anywhere are local.
    let before = registry.blob_gets().len();
    let results = get_all(&c, &format!("/v2/app/blobs/{}?ns={reg}", image.blobs[0])).await;
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(registry.blob_gets().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_transfer_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build(dir.path(), &[("big.bin", 24 << 20)]);
    image.push(&registry, "app");
    let reg = registry.name();
    let mut c = cluster(dir.path(), 3, &reg, &["--trust-cluster", "--upload-limit", "20M"]);
    let layer = image.blobs.last().unwrap().clone();
    let path = format!("/v2/app/blobs/{layer}?ns={reg}");
    // Node 0 gets the blob first (from its owner or the registry).
    let client = http_client();
    let body = client.get(c.agents[0].url(&path)).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.to_vec(), image.blob_bytes(&layer));
    // Nodes 1 and 2 start; node 0 dies while they are fetching (uploads are throttled, so this
    // lands mid-transfer whenever node 0 is one of their sources).
    let urls: Vec<String> = c.agents[1..].iter().map(|a| a.url(&path)).collect();
    let handles: Vec<_> = urls
        .into_iter()
        .map(|u| {
            let client = client.clone();
            tokio::spawn(async move {
                let r = client.get(u).timeout(Duration::from_secs(90)).send().await.map_err(|e| e.to_string())?;
                r.bytes().await.map(|b| b.to_vec()).map_err(|e| e.to_string())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.agents[0].proc.kill();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await.unwrap().unwrap_or_else(|e| panic!("node {}: {e}", i + 1));
        assert_eq!(got, image.blob_bytes(&layer), "node {} got the right bytes", i + 1);
    }
}
