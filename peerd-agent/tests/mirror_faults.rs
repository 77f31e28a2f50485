//! Bad input and upstream faults. The upstream here is a small fault-injecting HTTP server: a
//! real registry cannot produce 500s, stalls, truncated or wrong bodies on demand.
mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts requests per path; answers by the repository name in the path.
#[derive(Clone, Default)]
struct Faulty {
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Faulty {
    fn hits(&self, path_part: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|(k, _)| k.contains(path_part)).map(|(_, v)| v).sum()
    }

    async fn start(body: Vec<u8>) -> (Self, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let me = Faulty::default();
        let state = me.clone();
        let body = Arc::new(body);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let state = state.clone();
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => n += k,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let mut parts = head.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    *state.hits.lock().unwrap().entry(format!("{method} {path}")).or_default() += 1;
                    let ok_head = |len: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n");
                    if method == "HEAD" {
                        let _ = s.write_all(ok_head(body.len()).as_bytes()).await;
                        return;
                    }
                    if path.contains("/v2/fail/") {
                        let _ = s.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops").await;
                    } else if path.contains("/v2/stall/") {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    } else if path.contains("/v2/trunc/") {
                        let _ = s.write_all(ok_head(body.len()).as_bytes()).await;
                        let _ = s.write_all(&body[..body.len() / 2]).await;
                    } else if path.contains("/v2/liar/") {
                        let mut wrong = body.to_vec();
                        wrong[body.len() / 3] ^= 0xff;
                        let _ = s.write_all(ok_head(wrong.len()).as_bytes()).await;
                        let _ = s.write_all(&wrong).await;
                    } else {
                        let _ = s.write_all(ok_head(body.len()).as_bytes()).await;
                        let _ = s.write_all(&body).await;
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        (me, addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_never_reach_the_cache_and_every_wait_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..(2u32 << 20) + 12345).map(|i| (i % 253) as u8).collect();
    let digest = format!("sha256:{}", sha256_hex(&body));
    let (faulty, up) = Faulty::start(body.clone()).await;
    let agent = Agent::start(peerd(), dir.path(), &[format!("up=http://{up}")], &["--trust-cluster"]);
    let client = http_client();
    let blob = |repo: &str| agent.url(&format!("/v2/{repo}/blobs/{digest}?ns=up"));

    // 500 upstream: a clear 500 back, nothing cached.
    let r = client.get(blob("fail")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 500);

    // A stalled upstream: answered within the bound (--upstream-timeout 3), with 502.
    let t = Instant::now();
    let r = client.get(blob("stall")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 502);
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());

    // Truncated and wrong bodies: the client's transfer fails (never a complete wrong body),
    // and nothing is cached, so the next request goes upstream again. A body that broke off is
    // tried once more for its missing part (this upstream ignores Range and breaks off again);
    // one that failed its digest is not fetched again for the same request.
    for (repo, per_request) in [("trunc", 2), ("liar", 1)] {
        for round in 1..=2 {
            let r = client.get(blob(repo)).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "{repo}: headers were already sent");
            let got = r.bytes().await;
            assert!(got.is_err(), "{repo}: a bad body must end in a transfer error, not {} bytes", got.map(|b| b.len()).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(faulty.hits(&format!("GET /v2/{repo}/")), round * per_request, "{repo}: never cached");
        }
    }

    // The good body: streamed, verified, cached; the second read does not go upstream.
    for _ in 0..2 {
        let r = client.get(blob("good")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), digest);
        assert!(r.bytes().await.unwrap() == body);
    }
    // A bounded wait for the cache to commit (the last chunk is released before the rename).
    let deadline = Instant::now() + Duration::from_secs(10);
    while faulty.hits("GET /v2/good/") > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = faulty.hits("GET /v2/good/");
    let r = client.get(blob("good")).header("Range", "bytes=100-199").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes 100-199/{}", body.len()));
    assert!(r.bytes().await.unwrap() == body[100..200]);
    assert_eq!(faulty.hits("GET /v2/good/"), before, "served from cache");

    // Every fallback above is counted under its reason, and `peerd status` reports the cache.
    let m = client.get(agent.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let metric = |name: &str| -> u64 {
        m.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("{name} missing:\n{m}"))
    };
    assert!(metric("peerd_cache_hits_total ") >= 1);
    assert_eq!(metric("peerd_digest_mismatches_total "), 2, "the liar, twice");
    assert!(metric("peerd_upstream_errors_total ") >= 3, "stall + truncated bodies");
    assert!(metric("peerd_store_complete_blobs ") >= 1);
    let out = std::process::Command::new(peerd()).args(["status", "--addr", &agent.addr.to_string(), "--json"]).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && status.contains("\"complete_blobs\":1"), "{status}");
    let out = std::process::Command::new(peerd()).args(["status", "--addr", &agent.addr.to_string()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 complete"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_faulty, up) = Faulty::start(b"x".to_vec()).await;
    let agent = Agent::start(peerd(), dir.path(), &[format!("up=http://{up}")], &[]);
    let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let a = agent.addr;
    let req = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");
    let cases: Vec<(String, u16, &str)> = vec![
        (req(&format!("/v2/../../etc/blobs/{d}?ns=up")), 400, "NAME_INVALID"),
        (req(&format!("/v2/a/%2e%2e/blobs/{d}?ns=up")), 400, "NAME_INVALID"),
        (req("/v2/app/blobs/sha256:1234?ns=up"), 400, "DIGEST_INVALID"),
        (req("/v2/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e?ns=up"), 400, "DIGEST_INVALID"),
        (req("/v2/app/manifests/bad..tag!?ns=up"), 400, "MANIFEST_INVALID"),
        (req(&format!("/v2/app/blobs/{d}?ns=nowhere.example")), 404, "NAME_UNKNOWN"),
        (req(&format!("/v2/app/blobs/{d}")), 404, "NAME_UNKNOWN"),
        (format!("POST /v2/app/blobs/uploads/ HTTP/1.1\r\nHost: {a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), 405, "UNSUPPORTED"),
        (req("/v2/app/tags/list?ns=up"), 404, "UNSUPPORTED"),
        (req("/nothing"), 404, "NOT_FOUND"),
        (req("/blobs/http://169.254.169.254/latest/meta-data"), 403, "DENIED"),
    ];
    for (raw, status, code) in cases {
        let (got, body) = raw_request(a, &raw);
        assert_eq!(got, status, "{raw:?}: {body}");
        assert!(body.contains(&format!("\"code\":\"{code}\"")), "{raw:?}: {body}");
    }
    let (st, body) = raw_request(a, &req("/v2/"));
    assert_eq!((st, body.as_str()), (200, "{}"));

    // HTTP framing limits of the mirror's server.
    let huge = format!("GET /v2/ HTTP/1.1\r\nHost: {a}\r\nX-Big: {}\r\n\r\n", "a".repeat(20 << 10));
    assert_eq!(raw_request(a, &huge).0, 431);
    let many: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(raw_request(a, &format!("GET /v2/ HTTP/1.1\r\nHost: {a}\r\n{many}\r\n")).0, 431);
    assert_eq!(raw_request(a, "GARBAGE\r\n\r\n").0, 400);
    let with_body = format!("GET /v2/ HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(raw_request(a, &with_body).0, 405);
    // Keep-alive: two requests on one connection, both answered.
    let two = format!("GET /v2/ HTTP/1.1\r\nHost: {a}\r\n\r\nGET /healthz HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");
    let (st, rest) = raw_request(a, &two);
    assert_eq!(st, 200);
    assert!(rest.contains("HTTP/1.1 200 OK") && rest.ends_with("ok"), "{rest}");
}
