//! What a node's containerd already holds counts as cluster content: a real containerd pulls an
//! image straight from the registry (no agent involved), agent A is pointed at that containerd's
//! content directory, the registry then loses the blobs, and agent B still gets every blob through
//! its mirror, from A's containerd files (A keeps no copy), with no blob GET at the registry. A
//! blob removed from containerd is noticed and withdrawn.
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;

async fn metrics(client: &reqwest::Client, agent: &Agent) -> String {
    client.get(agent.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

fn metric(m: &str, name: &str) -> u64 {
    metric_value(m, name).unwrap_or_else(|| panic!("{name} missing:\n{m}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_in_containerd_are_served_to_peers_and_withdrawn_when_removed() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build(dir.path(), &[("big.bin", 4 << 20), ("small.txt", 100)]);
    image.push(&registry, "app");
    let reg = registry.name();

    // Node A's containerd pulls the image itself.
    let node_a = dir.path().join("a");
    let ctd = Containerd::start(&node_a);
    let reference = format!("{reg}/app:{}", image.tag);
    ctd.pull_plain(&reference, true).expect("containerd pulls from the registry");
    // Plus a blob of several pieces that never was in the registry (umoci's layers compress to
    // a few KiB), written through containerd's own ingest and kept from its GC by a root label.
    let big = pseudo_random((5 << 20) / 2 + 12345, 7);
    let big_digest = format!("sha256:{}", sha256_hex(&big));
    ingest(&ctd, &big, &big_digest);
    let mut blobs = image.blobs.clone();
    blobs.push(big_digest.clone());
    let bytes_of = |d: &str| if d == big_digest { big.clone() } else { image.blob_bytes(d) };
    let content = node_a.join("containerd/root/io.containerd.content.v1.content");
    for d in &blobs {
        assert!(content.join("blobs/sha256").join(&d[7..]).is_file(), "{d} in containerd's content store");
    }

    // The registry loses the blobs: only A's containerd has them now.
    let client = http_client();
    for d in &image.blobs {
        let r = client.delete(format!("http://{reg}/v2/app/blobs/{d}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 202, "deleting {d} from the registry");
    }

    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"cluster secret for the containerd test").unwrap();
    let peers: Vec<SocketAddr> = (0..2).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    let start = |i: usize, extra: &[&str]| {
        let d = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut args: Vec<String> = ["--peer-addr", &peers[i].to_string(), "--cluster-secret-file", &secret.display().to_string(), "--trust-cluster"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for p in &peers {
            args.extend(["--peer".to_string(), p.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(peerd(), &d, &[format!("{reg}=http://{reg}")], &args)
    };
    let a = start(0, &["--containerd-content-dir", content.to_str().unwrap()]);
    let b = start(1, &["--no-containerd-content"]);
    assert!(a.proc.log_text().contains("sharing containerd's blobs with peers"), "{}", a.proc.log_text());

    let before = registry.blob_gets().len();
    for d in &blobs {
        let r = client.get(b.url(&format!("/v2/app/blobs/{d}?ns={reg}"))).timeout(Duration::from_secs(60)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "blob {d} through B: {}", b.proc.log_text());
        assert!(r.bytes().await.unwrap().to_vec() == bytes_of(d), "blob {d} intact");
    }
    let gets = registry.blob_gets();
    assert_eq!(gets.len(), before, "no blob GET reached the registry: {:?}", &gets[before..]);

    let m = metrics(&client, &a).await;
    let total: u64 = blobs.iter().map(|d| bytes_of(d).len() as u64).sum();
    assert_eq!(metric(&m, "peerd_containerd_sent_bytes_total "), total, "A served every byte from containerd's files");
    assert_eq!(metric(&m, "peerd_containerd_verified_total "), blobs.len() as u64);
    assert_eq!(metric(&m, "peerd_containerd_verify_failed_total "), 0);
    assert_eq!(metric(&m, "peerd_store_blobs "), 0, "A kept no copy");
    let held = metric(&m, "peerd_containerd_blobs ");
    let mb = metrics(&client, &b).await;
    assert_eq!(metric(&mb, "peerd_peer_hits_total "), blobs.len() as u64, "B got each blob from a peer at the first try");
    assert_eq!(metric(&mb, "peerd_owner_failures_total "), 0);
    assert!(held >= blobs.len() as u64, "A advertises containerd's blobs (manifests and index too): {held}");

    // containerd drops the image and its content: the next scan (every 10 s) withdraws it.
    ctd.forget(&reference);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let m = metrics(&client, &a).await;
        if metric(&m, "peerd_containerd_blobs ") == 0 {
            assert!(metric(&m, "peerd_containerd_removed_total ") >= blobs.len() as u64);
            break;
        }
        let on_disk = std::fs::read_dir(content.join("blobs/sha256")).map(|r| r.count()).unwrap_or(0);
        assert!(Instant::now() < deadline, "still advertised after removal ({on_disk} files left on disk):\n{m}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `ctr content ingest` of `data` as `digest`, then a GC root label so containerd keeps it.
fn ingest(ctd: &Containerd, data: &[u8], digest: &str) {
    use std::io::Write;
    let mut child = ctd
        .ctr()
        .args(["content", "ingest", "--expected-size", &data.len().to_string(), "--expected-digest", digest, "peerd-test-blob"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ctr content ingest: {}", String::from_utf8_lossy(&out.stderr));
    run(ctd.ctr().args(["content", "label", digest, "containerd.io/gc.root=peerd-test"]));
}
