//! Which endpoints the kernel redirects: every configured registry's API host (and its name, as
//! clients write it in image references) and blob-storage host, resolved to addresses.
//! Resolution is repeated, so a registry whose DNS answer changes stays redirected; an address
//! that disappears from every answer is removed from the kernel's table.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use crate::mirror::Registry;

/// Something the node may dial: `host:port`, and the registry it belongs to (`None` for a
/// blob-storage host: its traffic is relayed, or served by the `/blobs/` proxy when intercepted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub registry: Option<Registry>,
}

/// Registry API hosts, registry names (where they are host names: `docker.io` is dialled as
/// registry-1.docker.io, which its URL already names), and blob hosts on 443.
pub fn targets<'a>(registries: impl Iterator<Item = &'a Registry>, blob_hosts: &[String]) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    let mut push = |t: Target| {
        if !out.iter().any(|o| o.host == t.host && o.port == t.port) {
            out.push(t);
        }
    };
    let mut regs: Vec<&Registry> = registries.collect();
    regs.sort_by(|a, b| a.name.cmp(&b.name));
    for r in regs {
        let Some(host) = r.url.host_str() else { continue };
        let port = r.url.port_or_known_default().unwrap_or(443);
        push(Target { host: host.trim_matches(['[', ']']).to_string(), port, registry: Some(r.clone()) });
        if r.name != "docker.io" {
            if let Some((h, p)) = split_host_port(&r.name, port) {
                push(Target { host: h, port: p, registry: Some(r.clone()) });
            }
        }
    }
    for b in blob_hosts {
        if let Some((h, p)) = split_host_port(b, 443) {
            push(Target { host: h, port: p, registry: None });
        }
    }
    out
}

/// `host`, `host:port`, `[v6]:port`, `v6` -> (host, port).
pub(super) fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((ip.to_string(), default_port));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some((sa.ip().to_string(), sa.port()));
    }
    let (h, p) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (s, default_port),
    };
    let ok = !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    ok.then(|| (h.to_ascii_lowercase(), p))
}

/// Resolves every target (bounded per host); failures leave a host out of this round's answer.
pub async fn resolve(targets: &[Target]) -> (BTreeMap<SocketAddr, Registry>, BTreeSet<SocketAddr>, Vec<String>) {
    let mut registries = BTreeMap::new();
    let mut all = BTreeSet::new();
    let mut failures = Vec::new();
    for t in targets {
        let q = format!("{}:{}", t.host, t.port);
        let addrs = match tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::lookup_host(q.clone())).await {
            Ok(Ok(a)) => a.collect::<Vec<_>>(),
            Ok(Err(e)) => {
                failures.push(format!("{q}: {e}"));
                continue;
            }
            Err(_) => {
                failures.push(format!("{q}: no DNS answer in 5s"));
                continue;
            }
        };
        for a in addrs {
            let a = SocketAddr::new(crate::bpf::canonical_ip(a.ip()), a.port());
            all.insert(a);
            if let Some(r) = &t.registry {
                registries.entry(a).or_insert_with(|| r.clone());
            }
        }
    }
    (registries, all, failures)
}

/// What to add to and remove from the kernel's table to go from `old` to `new`. Addresses that
/// failed to resolve this round are kept (a DNS hiccup must not stop redirecting).
pub fn diff(old: &BTreeSet<SocketAddr>, new: &BTreeSet<SocketAddr>, resolution_failed: bool) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let add = new.difference(old).copied().collect();
    let remove = if resolution_failed { Vec::new() } else { old.difference(new).copied().collect() };
    (add, remove)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::Registries;

    #[test]
    fn targets_cover_api_hosts_names_and_blob_hosts() {
        let regs = Registries::new(
            &["docker.io=https://registry-1.docker.io", "10.0.0.5:5000=http://10.0.0.5:5000", "mirror.local=https://reg.internal:8443"],
            false,
        )
        .unwrap();
        let t = targets(regs.iter(), &["blobs.example.net".into(), "[2001:db8::1]:9000".into()]);
        let hp: Vec<(String, u16, Option<String>)> =
            t.iter().map(|t| (t.host.clone(), t.port, t.registry.as_ref().map(|r| r.name.clone()))).collect();
        assert_eq!(
            hp,
            vec![
                ("10.0.0.5".into(), 5000, Some("10.0.0.5:5000".into())),
                ("registry-1.docker.io".into(), 443, Some("docker.io".into())),
                ("reg.internal".into(), 8443, Some("mirror.local".into())),
                ("mirror.local".into(), 8443, Some("mirror.local".into())),
                ("blobs.example.net".into(), 443, None),
                ("2001:db8::1".into(), 9000, None),
            ]
        );
    }

    #[test]
    fn diff_keeps_addresses_through_a_failed_round() {
        let a: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:443".parse().unwrap();
        let old: BTreeSet<_> = [a].into();
        let new: BTreeSet<_> = [b].into();
        assert_eq!(diff(&old, &new, false), (vec![b], vec![a]));
        assert_eq!(diff(&old, &new, true), (vec![b], vec![]));
        assert_eq!(diff(&new, &new, false), (vec![], vec![]));
    }

    #[tokio::test]
    async fn resolves_literals_and_reports_failures() {
        let t = vec![
            Target { host: "127.0.0.9".into(), port: 5000, registry: None },
            Target { host: "no-such-host.invalid".into(), port: 443, registry: None },
        ];
        let (_, all, failures) = resolve(&t).await;
        assert!(all.contains(&"127.0.0.9:5000".parse().unwrap()));
        assert_eq!(failures.len(), 1, "{failures:?}");
    }
}
