//! The mirror with real parts: Debian's docker-registry, containerd (ctr), skopeo, nginx.
mod support;

use std::time::{Duration, Instant};

use support::*;

#[test]
fn containerd_pulls_through_agent_then_from_cache_then_without_agent() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build(dir.path(), &[("big.bin", 3 << 20), ("mid.bin", 300 << 10), ("small.txt", 100)]);
    image.push(&registry, "app");
    let reg = registry.name();
    let reference = format!("{reg}/app:v1");

    let mut agent = Agent::start(peerd(), dir.path(), &[format!("{reg}=http://{reg}")], &[]);
    let ctd = Containerd::start(dir.path());
    ctd.mirror(&reg, agent.addr);

    // 1. Cold: through the agent, which fetches each blob from the registry exactly once.
    let before = registry.blob_gets().len();
    ctd.pull(&reference).expect("pull through the agent");
    for d in &image.blobs {
        assert_eq!(ctd.content(d), image.blob_bytes(d), "blob {d} pulled intact");
    }
    let cold = registry.blob_gets().len() - before;
    assert_eq!(cold, image.blobs.len(), "each blob fetched once from the registry: {:?}", registry.blob_gets());
    assert!(agent.proc.log_text().matches("cached from").count() >= image.blobs.len(), "{}", agent.proc.log_text());

    // 2. Warm: containerd forgot everything; the agent's cache alone serves every blob.
    ctd.forget(&reference);
    let before = registry.blob_gets().len();
    ctd.pull(&reference).expect("pull from the agent's cache");
    for d in &image.blobs {
        assert_eq!(ctd.content(d), image.blob_bytes(d));
    }
    assert_eq!(registry.blob_gets().len(), before, "no blob GETs reached the registry: {:?}", &registry.blob_gets()[before..]);

    // 3. Agent down: containerd falls back to the registry (hosts.toml) and still pulls.
    agent.proc.kill();
    ctd.forget(&reference);
    let t = Instant::now();
    ctd.pull(&reference).expect("pull with the agent stopped");
    // The registry logs a request after answering it: give its log a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while registry.blob_gets().len() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(registry.blob_gets().len() > before, "the fallback went to the registry");
    eprintln!("pull with agent down took {:?}", t.elapsed());
}

#[test]
fn skopeo_copies_through_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build(dir.path(), &[("a.bin", 1 << 20), ("b.bin", 10 << 10)]);
    image.push(&registry, "tools/skopeo-test");
    let reg = registry.name();
    // skopeo talks to the agent as if it were the registry: the Host header names the agent's
    // own address, mapped to the real registry.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _agent = Agent::start_on(peerd(), addr, dir.path(), &[format!("{addr}=http://{reg}")], &[]);
    let out = dir.path().join("copy");
    for round in 0..2 {
        let _ = std::fs::remove_dir_all(&out);
        let before = registry.blob_gets().len();
        run(std::process::Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{addr}/tools/skopeo-test:v1"),
            &format!("oci:{}:v1", out.display()),
        ]));
        for d in &image.blobs {
            let got = std::fs::read(out.join("blobs/sha256").join(&d[7..])).unwrap();
            assert_eq!(got, image.blob_bytes(d), "round {round}: blob {d}");
        }
        let fetched = registry.blob_gets().len() - before;
        if round == 0 {
            assert_eq!(fetched, image.blobs.len());
        } else {
            assert_eq!(fetched, 0, "second copy served from the cache");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_proxy_relays_then_serves_verified_ranges_from_cache() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    let data: Vec<u8> = (0..(6u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let hex = sha256_hex(&data);
    let rel = format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]);
    std::fs::create_dir_all(root.join(&rel).parent().unwrap()).unwrap();
    std::fs::write(root.join(&rel), &data).unwrap();
    let nginx = Nginx::start(dir.path(), &root);
    let blob_host = nginx.addr.to_string();
    let agent = Agent::start(peerd(), dir.path(), &[], &["--blob-host", &blob_host]);
    let url = agent.url(&format!("/blobs/http://{}/{rel}", nginx.addr));
    let client = http_client();
    let get = |range: &str| {
        let req = client.get(&url).header("Range", range.to_string());
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
        }
    };

    // Cold: relayed from the origin; a background fetch of the whole blob starts.
    let (st, body) = get("bytes=100-199").await;
    assert_eq!((st, body.as_slice()), (206, &data[100..200]));

    // Bounded wait until the background fetch has verified and committed the blob.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.proc.log_text().contains("prefetched") {
        assert!(Instant::now() < deadline, "blob never got cached: {}", agent.proc.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // nginx writes its access log after responding: let earlier lines land before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = nginx.gets();
    let last = data.len();
    for (range, want) in [
        ("bytes=-10", &data[last - 10..]),
        (&*format!("bytes={}-", last - 5), &data[last - 5..]),
        ("bytes=0-0", &data[..1]),
        (&*format!("bytes=1048570-{}", 3 << 20), &data[1048570..=(3 << 20)]),
        (&*format!("bytes=10-{}", u64::MAX), &data[10..]),
    ] {
        let (st, body) = get(range).await;
        assert_eq!(st, 206, "{range}");
        assert!(body == want, "{range}: wrong bytes");
    }
    assert_eq!(get("bytes=10-5").await.0, 416);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&format!("bytes={last}-")).await.0, 416);
    let (st, body) = get("bytes=0-1,5-6").await;
    assert_eq!((st, body.len()), (200, data.len()), "multi-range gets the whole blob");
    assert_eq!(nginx.gets(), n, "cached ranges never fetch from the origin (one HEAD access check is allowed)");

    // Not an open relay; clear errors for URLs it cannot handle.
    let status = |u: String| {
        let c = client.clone();
        async move { c.get(u).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(agent.url(&format!("/blobs/http://127.0.0.2:{}/{rel}", nginx.addr.port()))).await, 403);
    assert_eq!(status(agent.url(&format!("/blobs/http://{}/no/digest/here", nginx.addr))).await, 400);
    assert_eq!(status(agent.url("/blobs/ftp://127.0.0.1/x")).await, 400);
    assert_eq!(status(agent.url("/blobs/not-a-url")).await, 400);
}
