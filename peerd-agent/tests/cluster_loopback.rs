//! Several agents on one machine (loopback, static peers) in front of a real registry: the
//! registry sees each blob once for the whole cluster, even when every node asks at once.
mod support;

use std::{net::SocketAddr, time::Duration};

use support::*;

struct Cluster {
    agents: Vec<Agent>,
    /// Each node's directory and full argument list, to restart it as it was.
    nodes: Vec<(std::path::PathBuf, Vec<String>)>,
    registries: Vec<String>,
}

impl Cluster {
    fn restart(&mut self, i: usize) {
        let (dir, args) = &self.nodes[i];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agents[i] = Agent::start_on(peerd(), self.agents[i].addr, dir, &self.registries, &args);
    }
}

fn cluster(dir: &std::path::Path, n: usize, reg: &str, extra: &[&str]) -> Cluster {
    let peer_addrs: Vec<SocketAddr> = (0..n).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    std::fs::write(dir.join("secret"), b"cluster secret for the loopback test").unwrap();
    let secret = dir.join("secret").display().to_string();
    let mut agents = Vec::new();
    let mut nodes = Vec::new();
    let registries = vec![format!("{reg}=http://{reg}")];
    for (i, me) in peer_addrs.iter().enumerate() {
        let d = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut args: Vec<String> = vec!["--peer-addr".into(), me.to_string(), "--cluster-secret-file".into(), secret.clone()];
        for p in &peer_addrs {
            args.push("--peer".into());
            args.push(p.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        agents.push(Agent::start(peerd(), &d, &registries, &argv));
        nodes.push((d, args));
    }
    Cluster { agents, nodes, registries }
}

/// One incompressible layer of `mib` MiB pushed to a real registry, and `n` agents with uploads
/// throttled (so a peer transfer takes long enough to land faults and reads in the middle), or
/// with the given arguments.
/// Fields drop in order: the agents first (a failing test prints their logs, which live in the
/// directory), the directory last.
struct OneLayer {
    c: Cluster,
    _registry: Registry,
    image: Image,
    layer: String,
    path: String,
    _dir: tempfile::TempDir,
}

fn one_layer(n: usize, mib: usize) -> OneLayer {
    one_layer_with(n, mib, &["--trust-cluster", "--upload-limit", "20M"])
}

fn one_layer_with(n: usize, mib: usize, args: &[&str]) -> OneLayer {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build_with(dir.path(), &[("big.bin", mib << 20)], true);
    image.push(&registry, "app");
    let reg = registry.name();
    let c = cluster(dir.path(), n, &reg, args);
    let layer = image.blobs.iter().max_by_key(|d| image.blob_bytes(d).len()).unwrap().clone();
    let path = format!("/v2/app/blobs/{layer}?ns={reg}");
    OneLayer { _dir: dir, _registry: registry, image, layer, path, c }
}

impl OneLayer {
    /// GETs the layer from node `i` and checks the bytes.
    async fn get_ok(&self, i: usize) {
        let url = self.c.agents[i].url(&self.path);
        let body = http_client().get(url).timeout(Duration::from_secs(60)).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(body.to_vec(), self.image.blob_bytes(&self.layer), "node {i}");
    }

    /// `get_ok`, timed.
    async fn get_timed(&self, i: usize) -> Duration {
        let started = std::time::Instant::now();
        self.get_ok(i).await;
        started.elapsed()
    }
}

/// GETs `path` from each of `agents` at once, each bounded by `within`; the body, or why not (a
/// status other than 200).
fn spawn_gets<'a>(agents: impl IntoIterator<Item = &'a Agent>, path: &str, within: Duration) -> Vec<tokio::task::JoinHandle<Result<Vec<u8>, String>>> {
    let client = http_client();
    agents
        .into_iter()
        .map(|a| {
            let req = client.get(a.url(path)).timeout(within);
            tokio::spawn(async move {
                let r = req.send().await.map_err(|e| e.to_string())?;
                if r.status() != 200 {
                    return Err(format!("status {}", r.status()));
                }
                r.bytes().await.map(|b| b.to_vec()).map_err(|e| e.to_string())
            })
        })
        .collect()
}

async fn get_all(c: &Cluster, path: &str) -> Vec<Result<Vec<u8>, String>> {
    let mut out = Vec::new();
    for h in spawn_gets(&c.agents, path, Duration::from_secs(60)) {
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
    let mut t = one_layer(3, 24);
    // Node 0 gets the blob first (from its owner or the registry).
    t.get_ok(0).await;
    let (c, path, image, layer) = (&mut t.c, &t.path, &t.image, &t.layer);
    // Nodes 1 and 2 start; node 0 dies while they are fetching (uploads are throttled, so this
    // lands mid-transfer whenever node 0 is one of their sources).
    let handles = spawn_gets(&c.agents[1..], path, Duration::from_secs(90));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.agents[0].proc.kill();
    let killed = std::time::Instant::now();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await.unwrap().unwrap_or_else(|e| panic!("node {}: {e}", i + 1));
        assert_eq!(got, image.blob_bytes(layer), "node {} got the right bytes", i + 1);
        // Not asserted (timing is the benchmarks' business): how long the death cost.
        eprintln!("node {} complete {:?} after node 0 was killed", i + 1, killed.elapsed());
    }
}

async fn metrics(a: &Agent) -> String {
    http_client().get(a.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_from_peers_streams_to_the_client_while_it_arrives() {
    // Throttled uploads: the second node's download from the first takes over a second.
    let t = one_layer(2, 24);
    t.get_ok(0).await;
    t.get_ok(1).await;
    // Whichever node fetched second got it from the other, streamed as the pieces landed.
    let mut streamed = 0;
    for a in &t.c.agents {
        streamed += metric_value(&metrics(a).await, "peerd_streamed_arriving_total").unwrap_or(0);
    }
    assert!(streamed >= 1, "no response was streamed while its blob arrived");
}

/// A peer whose copy is wrong but consistent with its own piece hashes (so blake3 cannot tell):
/// a streamed response must end cut short (the last piece waits for the sha256), never as a
/// complete wrong body, and the next request gets the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_liar_never_gets_a_wrong_blob_served_whole() {
    let mut t = one_layer(2, 8);
    t.get_ok(0).await;
    let (c, path, image, layer) = (&mut t.c, &t.path, &t.image, &t.layer);
    let client = http_client();
    // Node 0 lies: piece 1 altered on disk and its hash in the metadata made to match.
    // Node 1 keeps no copy (it may have fetched the blob as its rendezvous owner).
    c.agents[0].proc.kill();
    c.agents[1].proc.kill();
    let hex = layer.trim_start_matches("sha256:");
    for ext in ["meta", "data"] {
        let _ = std::fs::remove_file(c.nodes[1].0.join(format!("agent/store/blobs/sha256/{hex}.{ext}")));
    }
    let blobs = c.nodes[0].0.join("agent/store/blobs/sha256");
    let data = blobs.join(format!("{hex}.data"));
    let mut bytes = std::fs::read(&data).unwrap();
    let piece = 1 << 20;
    for b in &mut bytes[piece..piece + 4096] {
        *b ^= 0x5a;
    }
    std::fs::write(&data, &bytes).unwrap();
    let meta = blobs.join(format!("{hex}.meta"));
    let text = std::fs::read_to_string(&meta).unwrap();
    let fake = blake3::hash(&bytes[piece..2 * piece]).to_hex().to_string();
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("check "))
        .map(|l| if l.starts_with("piece 1 ") { format!("piece 1 {fake}\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(&meta, format!("{body}check {}\n", blake3::hash(body.as_bytes()).to_hex())).unwrap();
    c.restart(0);
    c.restart(1);
    let node1 = &c.agents[1];
    let count = |m: &str, name: &str| metric_value(m, name).unwrap_or(0);
    let mut lied_to = false;
    // Node 1 has no copy and asks node 0 (static peers may hold anything). If it could not
    // reach node 0 in time (a loaded machine), it went upstream itself: forget that copy and ask
    // again, at most three times.
    for _ in 0..3 {
        let first = async {
            let r = client.get(node1.url(path)).timeout(Duration::from_secs(60)).send().await.map_err(|e| e.to_string())?;
            r.bytes().await.map(|b| b.to_vec()).map_err(|e| e.to_string())
        }
        .await;
        if let Ok(got) = &first {
            assert!(got == &image.blob_bytes(layer), "a wrong blob was served whole ({} bytes)", got.len());
        }
        let m = metrics(node1).await;
        if count(&m, "peerd_cluster_lied_total") > 0 {
            // Streamed from the liar's pieces: it can only end cut short, and counted.
            let aborted = count(&m, "peerd_stream_aborted_total");
            assert!(first.is_err() && aborted >= 1, "expected a counted abort, got {first:?} (aborted {aborted})");
            lied_to = true;
            break;
        }
        assert!(first.is_ok(), "node 1 never reached node 0, yet failed: {first:?}");
        client.delete(node1.url(&format!("/cache/{layer}"))).send().await.unwrap();
    }
    assert!(lied_to, "node 1 never got the blob from node 0");
    // The digest is distrusted now: the next request is served from upstream, not the liar.
    let again = client.get(node1.url(path)).timeout(Duration::from_secs(60)).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(again.to_vec(), image.blob_bytes(layer), "the next request gets the right bytes");
}

/// `--upstream-limit`, `--upload-limit` and `--download-limit` hold: a 12 MiB layer at 4 MiB/s
/// (after one second of burst) takes at least 2 s from upstream, and from a peer. A lower bound
/// on time, which only a limit that does not hold can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limits_hold_for_upstream_and_peer_transfers() {
    let bound = Duration::from_millis(1_900);
    // A single node is the blob's owner: it reads upstream itself.
    let t = one_layer_with(1, 12, &["--trust-cluster", "--upstream-limit", "4M"]);
    let took = t.get_timed(0).await;
    assert!(took >= bound, "12 MiB from upstream at 4 MiB/s took {took:?}");
    // Two nodes, the limit on either side: node 1 drops the copy it may hold as the blob's
    // owner, then gets it from node 0.
    for limit in ["--upload-limit", "--download-limit"] {
        let t = one_layer_with(2, 12, &["--trust-cluster", limit, "4M"]);
        t.get_ok(0).await;
        let node1 = &t.c.agents[1];
        http_client().delete(node1.url(&format!("/cache/{}", t.layer))).send().await.unwrap();
        let took = t.get_timed(1).await;
        assert!(took >= bound, "12 MiB from a peer with {limit} 4M took {took:?}");
        let pieces = metric_value(&metrics(node1).await, "peerd_peer_pieces_total").unwrap_or(0);
        assert!(pieces >= 12, "node 1 got {pieces} pieces from its peer");
        let gets = t._registry.blob_gets().iter().filter(|l| l.contains(t.layer.as_str())).count();
        assert_eq!(gets, 1, "the layer was fetched {gets} times from the registry");
    }
}

/// Status and body bytes of a registry access-log line (`"GET ... HTTP/1.1" 206 16777216 ...`).
fn status_and_bytes(line: &str) -> (u16, u64) {
    let after = line.split("HTTP/1.1\" ").nth(1).unwrap_or_default();
    let mut f = after.split_whitespace();
    (f.next().and_then(|s| s.parse().ok()).unwrap_or(0), f.next().and_then(|s| s.parse().ok()).unwrap_or(0))
}

/// A blob of several 16 MiB chunks is split by its owner: it and the next members in rendezvous
/// order each fetch a part with byte ranges while all four nodes ask at once, and the registry
/// still sends each byte once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_is_fetched_in_parts_each_byte_once() {
    let t = one_layer_with(4, 40, &["--trust-cluster"]);
    let want = t.image.blob_bytes(&t.layer);
    for (i, r) in get_all(&t.c, &t.path).await.into_iter().enumerate() {
        assert!(r.as_ref().is_ok_and(|b| *b == want), "node {i}: {:?}", r.map(|b| b.len()));
    }
    let gets: Vec<String> = t._registry.blob_gets().into_iter().filter(|l| l.contains(t.layer.as_str())).collect();
    let sent: u64 = gets.iter().map(|l| status_and_bytes(l).1).sum();
    assert_eq!(sent, want.len() as u64, "the registry sent the layer's bytes more than once: {gets:#?}");
    assert!(gets.len() >= 3 && gets.iter().all(|l| status_and_bytes(l).0 == 206), "expected one ranged GET per chunk: {gets:#?}");
    let mut splits = 0;
    let mut parts = 0;
    for a in &t.c.agents {
        let m = metrics(a).await;
        splits += metric_value(&m, "peerd_split_fetches_total").unwrap_or(0);
        parts += metric_value(&m, "peerd_peer_part_fetches_total").unwrap_or(0);
    }
    assert_eq!(splits, 1, "one owner splits the fetch");
    assert!(parts >= 2, "the helpers were asked for their parts ({parts})");
}

/// A helper that dies while fetching its part of a split blob is replaced by the owner, and the
/// nodes left still get the right bytes. Upstream reads are throttled so the kill lands while
/// the parts are still arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_killed_mid_part_is_replaced_by_the_owner() {
    let mut t = one_layer_with(3, 48, &["--trust-cluster", "--upstream-limit", "8M"]);
    let addr_of = |args: &[String]| -> SocketAddr {
        let i = args.iter().position(|a| a == "--peer-addr").unwrap();
        args[i + 1].parse().unwrap()
    };
    let addrs: Vec<SocketAddr> = t.c.nodes.iter().map(|(_, args)| addr_of(args)).collect();
    let digest: peerd_agent::store::Digest = t.layer.parse().unwrap();
    let ranked = peerd_agent::transfer::ranked(&digest, &addrs);
    let node = |a: SocketAddr| addrs.iter().position(|x| *x == a).unwrap();
    let (owner, helper) = (node(ranked[0]), node(ranked[1]));
    let handles = spawn_gets(&t.c.agents, &t.path, Duration::from_secs(90));
    tokio::time::sleep(Duration::from_millis(400)).await;
    t.c.agents[helper].proc.kill();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await.unwrap();
        if i != helper {
            assert!(got.as_ref().is_ok_and(|b| *b == t.image.blob_bytes(&t.layer)), "node {i}: {:?}", got.map(|b| b.len()));
        }
    }
    let m = metrics(&t.c.agents[owner]).await;
    assert_eq!(metric_value(&m, "peerd_split_fetches_total"), Some(1), "the owner split the fetch");
    let takeovers = metric_value(&m, "peerd_part_takeovers_total").unwrap_or(0);
    assert!(takeovers >= 1, "the owner took over the dead helper's part ({takeovers})");
}

/// Lazy loading: a range of a blob this node lacks is answered with the pieces covering it from
/// a peer holding the blob, checked against that peer's verified manifest; the registry sends
/// nothing for it (the rest of the blob follows in the background, from the peer too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_blob_held_by_a_peer_comes_from_that_peer() {
    let t = one_layer_with(2, 8, &["--trust-cluster"]);
    t.get_ok(0).await;
    let node1 = &t.c.agents[1];
    let client = http_client();
    // Node 1 may hold it as the blob's rendezvous owner: drop that copy (once it is complete:
    // a copy still being written answers 409).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = client.delete(node1.url(&format!("/cache/{}", t.layer))).send().await.unwrap().status().as_u16();
        if st == 204 || st == 404 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node 1's copy never became removable ({st})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gets = t._registry.blob_gets().len();
    let bytes = t.image.blob_bytes(&t.layer);
    for (start, end) in [(0usize, 4095usize), (3 << 20, (3 << 20) + 1_048_575), (bytes.len() - 100, bytes.len() - 1), (1_000_000, 1_100_000)] {
        let r = client.get(node1.url(&t.path)).header("Range", format!("bytes={start}-{end}")).timeout(Duration::from_secs(30)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 206, "bytes={start}-{end}");
        assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes {start}-{end}/{}", bytes.len()));
        assert!(r.bytes().await.unwrap() == bytes[start..=end], "bytes={start}-{end}: wrong bytes");
    }
    let count = |m: &str, name: &str| metric_value(m, name).unwrap_or(0);
    let m = metrics(node1).await;
    assert!(count(&m, "peerd_ranges_from_peers_total") >= 1, "no range came from the peer:\n{m}");
    // The background prefetch completes the blob from the peer as well.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.get(node1.url(&t.path)).header("Range", "bytes=0-0").send().await.unwrap();
        if count(&metrics(node1).await, "peerd_cache_hits_total") >= 1 {
            assert_eq!(r.status().as_u16(), 206);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the blob never completed on node 1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(t._registry.blob_gets().len(), gets, "the registry served node 1's ranges or prefetch");
}
