//! The admin API against openapi.yaml: every documented path answers as documented (status codes,
//! required JSON fields), and `peerd cache ls|rm` and `peerd status` work against a real agent.
mod support;

use std::process::Command;

use support::*;

/// `path -> [(method, [status])]` read from openapi.yaml (its simple, known layout).
fn documented() -> Vec<(String, String, Vec<u16>)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let mut out = Vec::new();
    let (mut path, mut method) = (String::new(), String::new());
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = format!("/{p}");
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')).filter(|m| ["get", "delete", "post"].contains(m)) {
            method = m.to_string();
            out.push((path.clone(), method.clone(), Vec::new()));
        } else if let Some(code) = line.trim_start().strip_prefix('"').and_then(|l| l.get(..3)).and_then(|c| c.parse().ok()) {
            if line.starts_with("        \"") {
                out.last_mut().unwrap().2.push(code);
            }
        }
    }
    let _ = method;
    out
}

fn json_keys(v: &serde_json::Value, keys: &[&str]) {
    for k in keys {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_matches_openapi_and_the_cli_works() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build(dir.path(), &[("a.bin", 300 << 10)]);
    image.push(&registry, "app");
    let reg = registry.name();
    let agent = Agent::start(peerd(), dir.path(), &[format!("{reg}=http://{reg}")], &["--trust-cluster"]);
    let c = http_client();
    let layer = image.blobs.last().unwrap().clone();
    assert_eq!(c.get(agent.url(&format!("/v2/app/blobs/{layer}?ns={reg}"))).send().await.unwrap().bytes().await.unwrap().to_vec(), image.blob_bytes(&layer));

    let docs = documented();
    for p in ["/healthz", "/metrics", "/status", "/cache", "/cache/{digest}", "/preheat", "/v2/", "/v2/{name}/blobs/{digest}", "/blobs/{url}"] {
        assert!(docs.iter().any(|(path, _, _)| path == p), "{p} is not documented in openapi.yaml");
    }
    let code_of = |path: &str, method: &str| docs.iter().find(|(p, m, _)| p == path && m == method).map(|d| d.2.clone()).unwrap_or_default();

    for (path, keys) in [("/status", &["version", "peer_addr", "cache", "requests", "bytes", "in_progress", "peers", "peer_data"][..]), ("/cache", &[][..])] {
        let r = c.get(agent.url(path)).send().await.unwrap();
        assert!(code_of(path, "get").contains(&r.status().as_u16()), "{path}: {}", r.status());
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        json_keys(&v, keys);
        if path == "/cache" {
            let items = v.as_array().unwrap();
            assert!(!items.is_empty());
            for i in items {
                json_keys(i, &["digest", "size", "complete", "pieces_present", "pieces_total"]);
            }
        }
    }
    for path in ["/healthz", "/metrics"] {
        let st = c.get(agent.url(path)).send().await.unwrap().status().as_u16();
        assert!(code_of(path, "get").contains(&st), "{path}: {st}");
    }

    // The CLI against the same endpoints.
    let addr = agent.addr.to_string();
    let ls = Command::new(peerd()).args(["cache", "ls", "--addr", &addr]).output().unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains(&layer), "{}", String::from_utf8_lossy(&ls.stdout));
    for (q, want) in [("", 400), ("?image=no-slash", 400), ("?image=unknown.example/x:1", 404)] {
        let st = c.post(agent.url(&format!("/preheat{q}"))).send().await.unwrap().status().as_u16();
        assert_eq!(st, want, "/preheat{q}");
        assert!(code_of("/preheat", "post").contains(&st));
    }
    let bad = c.delete(agent.url("/cache/sha256:nothex")).send().await.unwrap().status().as_u16();
    assert_eq!(bad, 400);
    assert!(code_of("/cache/{digest}", "delete").contains(&bad));
    let rm = Command::new(peerd()).args(["cache", "rm", &layer, "--addr", &addr]).output().unwrap();
    assert!(rm.status.success(), "{}", String::from_utf8_lossy(&rm.stderr));
    let gone = c.delete(agent.url(&format!("/cache/{layer}"))).send().await.unwrap().status().as_u16();
    assert_eq!(gone, 404);
    assert!(code_of("/cache/{digest}", "delete").contains(&gone));
    let ls = Command::new(peerd()).args(["cache", "ls", "--addr", &addr, "--json"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ls.stdout).contains(&layer), "removed blob still listed");
    // Removed from the cache: the next read goes upstream again and is correct.
    let before = registry.blob_gets().len();
    assert_eq!(c.get(agent.url(&format!("/v2/app/blobs/{layer}?ns={reg}"))).send().await.unwrap().bytes().await.unwrap().to_vec(), image.blob_bytes(&layer));
    assert_eq!(registry.blob_gets().len(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_fetches_every_blob_once_ahead_of_the_pull() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = Image::build(dir.path(), &[("a.bin", 2 << 20), ("b.bin", 100 << 10)]);
    image.push(&registry, "team/app");
    let reg = registry.name();
    let agent = Agent::start(peerd(), dir.path(), &[format!("{reg}=http://{reg}")], &[]);
    let before = registry.blob_gets().len();
    let out = Command::new(peerd()).args(["preheat", &format!("{reg}/team/app:v1"), "--addr", &agent.addr.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{} blobs", image.blobs.len())), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(registry.blob_gets().len() - before, image.blobs.len(), "each blob fetched once");
    // The rollout's pulls are served from the cache.
    let c = http_client();
    let before = registry.blob_gets().len();
    for d in &image.blobs {
        let body = c.get(agent.url(&format!("/v2/team/app/blobs/{d}?ns={reg}"))).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(body.to_vec(), image.blob_bytes(d));
    }
    assert_eq!(registry.blob_gets().len(), before, "no blob GETs after preheat");
    // A bad reference is a clear error.
    let out = Command::new(peerd()).args(["preheat", "no-slash", "--addr", &agent.addr.to_string()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("registry/name"));
}
