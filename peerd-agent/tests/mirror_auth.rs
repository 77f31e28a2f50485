//! Multi-tenant safety with a real private registry (docker-registry with htpasswd auth): cached
//! content goes only to clients the registry itself would serve.
mod support;

use support::*;

fn basic(user: &str, pass: &str) -> String {
    // RFC 7617 Basic credentials, base64 by hand (a test-only helper, 10 lines).
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for c in raw.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    format!("Basic {out}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_layers_only_reach_clients_the_registry_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start_with(dir.path(), Some(&[("alice", "wonderland"), ("bob", "builder")]));
    let image = Image::build(dir.path(), &[("secret.bin", 256 << 10)]);
    image.push_as(&registry, "private/app", Some("alice:wonderland"));
    let reg = registry.name();
    let agent = Agent::start(peerd(), dir.path(), &[format!("{reg}=http://{reg}")], &["--auth-ttl", "60"]);
    let client = http_client();
    let layer = image.blobs.last().unwrap().clone();
    let url = agent.url(&format!("/v2/private/app/blobs/{layer}?ns={reg}"));
    let get = |auth: Option<String>| {
        let mut r = client.get(&url);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        async move {
            let r = r.send().await.unwrap();
            let challenge = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), challenge, r.bytes().await.unwrap_or_default().to_vec())
        }
    };

    // Alice pulls: fetched from the registry with her credentials, cached.
    let (st, _, body) = get(Some(basic("alice", "wonderland"))).await;
    assert_eq!(st, 200);
    assert_eq!(body, image.blob_bytes(&layer));
    let gets = registry.blob_gets().len();

    // Anonymous: the registry's challenge comes back untouched, no bytes.
    let (st, challenge, body) = get(None).await;
    assert_eq!(st, 401, "anonymous client must not get a cached private layer");
    assert!(challenge.as_deref().unwrap_or("").contains("Basic"), "{challenge:?}");
    assert!(!body.windows(16).any(|w| image.blob_bytes(&layer).windows(16).next() == Some(w)));

    // Wrong password: refused the same way.
    let (st, _, _) = get(Some(basic("alice", "guess"))).await;
    assert_eq!(st, 401);

    // Bob has his own valid credentials: the registry confirms, the cache serves.
    let (st, _, body) = get(Some(basic("bob", "builder"))).await;
    assert_eq!(st, 200);
    assert_eq!(body, image.blob_bytes(&layer));
    assert_eq!(registry.blob_gets().len(), gets, "served from cache after the upstream check, not refetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_cluster_serves_cached_content_to_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start_with(dir.path(), Some(&[("alice", "wonderland")]));
    let image = Image::build(dir.path(), &[("x.bin", 64 << 10)]);
    image.push_as(&registry, "private/app", Some("alice:wonderland"));
    let reg = registry.name();
    let agent = Agent::start(peerd(), dir.path(), &[format!("{reg}=http://{reg}")], &["--trust-cluster"]);
    let client = http_client();
    let layer = image.blobs.last().unwrap().clone();
    let url = agent.url(&format!("/v2/private/app/blobs/{layer}?ns={reg}"));
    let r = client.get(&url).header("Authorization", basic("alice", "wonderland")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The whole body arrives only after the blob was verified and committed to the cache.
    assert_eq!(r.bytes().await.unwrap().to_vec(), image.blob_bytes(&layer));
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "--trust-cluster: the documented opt-out");
    assert_eq!(r.bytes().await.unwrap().to_vec(), image.blob_bytes(&layer));
}

#[test]
fn basic_encoding() {
    assert_eq!(basic("Aladdin", "open sesame"), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
}
