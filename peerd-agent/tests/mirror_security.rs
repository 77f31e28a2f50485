//! What a client on the node network can try against one agent: read someone else's cached
//! private blob, make the agent fetch internal URLs (SSRF), run it out of descriptors, or stall a
//! blob for everyone. The registry is a real docker-registry behind a per-repository access
//! check (a small proxy here: `corp/` needs alice's credentials, everything else is public), as a
//! multi-tenant registry answers.
mod support;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALICE: &str = "Basic YWxpY2U6d29uZGVybGFuZA=="; // alice:wonderland

/// A per-repository access check in front of `registry`: requests under `/v2/corp/` without
/// alice's credentials get 401 with a challenge; everything else is forwarded as is.
async fn access_proxy(registry: SocketAddr) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let authed = head.lines().any(|l| l.to_ascii_lowercase().starts_with("authorization:") && l.contains(&ALICE[6..]));
                if path.starts_with("/v2/corp/") && !authed {
                    let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                    let _ = c
                        .write_all(format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"corp\"\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                        .await;
                    return;
                }
                // One request per connection: the head goes on with "Connection: close".
                let head = head.replacen("\r\n", "\r\nConnection: close\r\n", 1);
                let Ok(mut up) = tokio::net::TcpStream::connect(registry).await else { return };
                if up.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut up, &mut c).await;
            });
        }
    });
    addr
}

/// A loopback service the agent must never relay: it answers every request with a secret.
async fn internal_service(hits: Arc<AtomicUsize>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            hits.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let _ = c.read(&mut b).await;
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\nINTERNAL-SECRET").await;
            });
        }
    });
    addr
}

/// A configured blob host that redirects everything to `to`.
async fn redirector(to: String) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let _ = c.read(&mut b).await;
                let _ = c.write_all(format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()).await;
            });
        }
    });
    addr
}

async fn get(url: &str, auth: Option<&str>) -> (u16, Vec<u8>) {
    let mut r = http_client().get(url).timeout(Duration::from_secs(30));
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() >= 16 && hay.windows(16).any(|w| w == &needle[..16])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_private_blob_reaches_only_clients_the_registry_accepts_for_that_blob() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let private = Image::build(dir.path().join("p").as_path(), &[("secret.bin", 300 << 10)]);
    private.push(&registry, "corp/private");
    let public = Image::build(dir.path().join("q").as_path(), &[("public.bin", 200 << 10)]);
    public.push(&registry, "pub/repo");
    let proxy = access_proxy(registry.addr).await;
    let reg = proxy.to_string();
    let agent = Agent::start(peerd(), dir.path(), &[format!("{reg}=http://{reg}")], &[]);
    let secret = private.blobs.last().unwrap().clone();
    let secret_bytes = private.blob_bytes(&secret);
    let open = public.blobs.last().unwrap().clone();

    // Alice pulls her private layer: cached.
    let (st, body) = get(&agent.url(&format!("/v2/corp/private/blobs/{secret}?ns={reg}")), Some(ALICE)).await;
    assert_eq!((st, body == secret_bytes), (200, true));
    // Anonymous, same path: the registry's 401.
    assert_eq!(get(&agent.url(&format!("/v2/corp/private/blobs/{secret}?ns={reg}")), None).await.0, 401);
    // Anonymous reads a public blob twice (a fresh access answer for pub/repo), then asks for
    // alice's digest under pub/repo: the decision covers (repository, digest), and the registry
    // does not serve that digest from pub/repo.
    for _ in 0..2 {
        assert_eq!(get(&agent.url(&format!("/v2/pub/repo/blobs/{open}?ns={reg}")), None).await.0, 200);
    }
    let (st, body) = get(&agent.url(&format!("/v2/pub/repo/blobs/{secret}?ns={reg}")), None).await;
    assert_ne!(st, 200, "alice's blob through a public repository's permission");
    assert!(!contains(&body, &secret_bytes));

    // Through /blobs/: another port of the registry's host (the registry itself, no access
    // check in front) is not a configured origin.
    let direct = format!("/blobs/http://127.0.0.1:{}/v2/corp/private/blobs/{secret}", registry.addr.port());
    let (st, body) = get(&agent.url(&direct), None).await;
    assert_eq!(st, 403, "another port of an allowed host");
    assert!(!contains(&body, &secret_bytes));
    // A non-canonical path the registry would redirect (301) is not a blob URL at all.
    let (st, body) = get(&agent.url(&format!("/blobs/http://{reg}/v2/corp//private/blobs/{secret}")), None).await;
    assert_eq!(st, 400);
    assert!(!contains(&body, &secret_bytes));
    // The configured origin, public repository path: the registry says no (404).
    let (st, body) = get(&agent.url(&format!("/blobs/http://{reg}/v2/pub/repo/blobs/{secret}")), None).await;
    assert_ne!(st, 200);
    assert!(!contains(&body, &secret_bytes));
    // The exact private URL with alice's credentials is fine.
    let (st, body) = get(&agent.url(&format!("/blobs/http://{reg}/v2/corp/private/blobs/{secret}")), Some(ALICE)).await;
    assert_eq!((st, body == secret_bytes), (200, true));

    // The cache listing (every digest) answers this node only; from here (loopback) it works.
    assert_eq!(get(&agent.url("/cache"), None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blob_proxy_reaches_configured_origins_only() {
    let dir = tempfile::tempdir().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let internal = internal_service(hits.clone()).await;
    let hex = "ab".repeat(32);
    let path = format!("docker/registry/v2/blobs/sha256/ab/{hex}/data");
    let bounce = redirector(format!("http://{internal}/{path}")).await;
    let agent = Agent::start(peerd(), dir.path(), &[], &["--blob-host", &bounce.to_string()]);
    let p = internal.port();
    for host in [format!("127.0.0.1:{p}"), format!("0x7f000001:{p}"), format!("2130706433:{p}"), format!("127.1:{p}"), format!("[::ffff:127.0.0.1]:{p}")] {
        let (st, body) = get(&agent.url(&format!("/blobs/http://{host}/{path}")), None).await;
        assert_eq!(st, 403, "{host}");
        assert!(!String::from_utf8_lossy(&body).contains("INTERNAL-SECRET"), "{host}");
    }
    // A configured host redirecting to loopback: the redirect is not followed.
    let (st, body) = get(&agent.url(&format!("/blobs/http://{bounce}/{path}")), None).await;
    assert!(st >= 400, "got {st}");
    assert!(!String::from_utf8_lossy(&body).contains("INTERNAL-SECRET"));
    // The agent itself, nested.
    let nested = format!("/blobs/http://{}/blobs/http://{}/{path}", agent.addr, agent.addr);
    assert_eq!(get(&agent.url(&nested), None).await.0, 403);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the internal service was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_does_not_end_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(peerd(), dir.path(), &[], &[]);
    // As if the node's limit were tiny: soft and hard 128 on the running agent.
    run(std::process::Command::new("prlimit").args(["--pid", &agent.proc.pid().to_string(), "--nofile=128:128"]));
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = tokio::net::TcpStream::connect(agent.addr).await {
            idle.push(s);
        }
    }
    // A client that drips its head a byte at a time is cut at the head deadline (10 s), not
    // kept alive by each byte.
    let mut drip = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(idle);
    let started = Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(20) {
        if drip.write_all(b"G").await.is_err() {
            cut = true;
            break;
        }
        let mut b = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(900), drip.read(&mut b)).await {
            cut = true;
            break;
        }
    }
    assert!(cut, "a dripping client was never cut off");
    assert!(started.elapsed() < Duration::from_secs(15), "cut after {:?}", started.elapsed());
    assert!(agent.proc.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the agent exited: {}", agent.proc.log_text());
    assert_eq!(get(&agent.url("/healthz"), None).await.0, 200);
    let metrics = String::from_utf8(get(&agent.url("/metrics"), None).await.1).unwrap();
    assert!(metric_value(&metrics, "peerd_accept_errors_total").unwrap_or(0) > 0, "no accept error counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_stalls_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build_with(dir.path(), &[("big.bin", 64 << 20)], true);
    image.push(&registry, "app");
    let reg = registry.name();
    let agent = Agent::start(peerd(), dir.path(), &[format!("{reg}=http://{reg}")], &["--trust-cluster"]);
    let layer = image.blobs.iter().max_by_key(|d| image.blob_bytes(d).len()).unwrap().clone();
    let path = format!("/v2/app/blobs/{layer}?ns={reg}");
    // The staller: reads 512 bytes of the uncached blob and stops reading.
    let mut staller = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    staller.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut first = [0u8; 512];
    staller.read_exact(&mut first).await.unwrap();
    // Everyone else gets the whole blob promptly, and it is cached meanwhile.
    let t = Instant::now();
    let (st, body) = get(&agent.url(&path), None).await;
    assert_eq!(st, 200);
    assert!(body == image.blob_bytes(&layer), "wrong bytes");
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?} behind a stalled client", t.elapsed());
    let gets = registry.blob_gets().iter().filter(|l| l.contains(&layer)).count();
    assert_eq!(gets, 1, "one upstream fetch for both clients");
    let (st, body) = get(&agent.url(&path), None).await;
    assert_eq!((st, body.len()), (200, image.blob_bytes(&layer).len()));
    assert_eq!(registry.blob_gets().iter().filter(|l| l.contains(&layer)).count(), 1, "cached while the staller sat");
    drop(staller);
}
