//! Upstream registries and blob stores: which ones exist, a bounded HTTP client for them (which
//! counts and paces every body byte it reads), and the feed that writes a body into the store.
pub mod feed;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;

use crate::{
    metrics::{counter, MetricsSource},
    ratelimit::RateLimit,
};

use reqwest::{header, Method, StatusCode, Url};

/// An upstream registry the mirror may fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// As clients name it: `docker.io`, `ghcr.io`, `10.0.0.5:5000`.
    pub name: String,
    /// Where its API lives: `https://registry-1.docker.io`.
    pub url: Url,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("registry {0:?} must be NAME=URL (for example docker.io=https://registry-1.docker.io)")]
    Syntax(String),
    #[error("registry {0:?}: URL must be http:// or https:// with a host: {1}")]
    Url(String, String),
}

/// The configured registries, looked up by the name a request carries (`ns=` or Host).
#[derive(Debug, Clone, Default)]
pub struct Registries {
    by_name: HashMap<String, Registry>,
}

/// Public registries known without configuration.
pub const DEFAULT_REGISTRIES: &[(&str, &str)] = &[
    ("docker.io", "https://registry-1.docker.io"),
    ("ghcr.io", "https://ghcr.io"),
    ("mcr.microsoft.com", "https://mcr.microsoft.com"),
    ("registry.k8s.io", "https://registry.k8s.io"),
    ("quay.io", "https://quay.io"),
];

impl Registries {
    /// The defaults, then `flags` (`NAME=URL`) on top (a flag replaces a default of the same name).
    pub fn new<S: AsRef<str>>(flags: &[S], defaults: bool) -> Result<Self, ConfigError> {
        let mut r = Registries::default();
        if defaults {
            for (n, u) in DEFAULT_REGISTRIES {
                r.add(&format!("{n}={u}"))?;
            }
        }
        for f in flags {
            r.add(f.as_ref())?;
        }
        Ok(r)
    }

    fn add(&mut self, flag: &str) -> Result<(), ConfigError> {
        let (name, url) = flag.split_once('=').ok_or_else(|| ConfigError::Syntax(flag.into()))?;
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(ConfigError::Syntax(flag.into()));
        }
        let url = Url::parse(url.trim()).map_err(|e| ConfigError::Url(flag.into(), e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ConfigError::Url(flag.into(), "unsupported scheme or no host".into()));
        }
        self.by_name.insert(name.clone(), Registry { name, url });
        Ok(())
    }

    /// The registry a request is for: containerd's `ns=` query parameter when it uses us as a
    /// hosts.toml mirror, else the Host header (transparent mode: the client thinks it talks to
    /// the registry itself).
    pub fn resolve(&self, ns: Option<&str>, host: Option<&str>) -> Option<&Registry> {
        let key = |s: &str| s.trim().to_ascii_lowercase();
        if let Some(ns) = ns {
            return self.by_name.get(&key(ns));
        }
        let host = key(host?);
        self.by_name.get(&host).or_else(|| {
            // "host:443" / "host:80" name the same registry as "host".
            let bare = host.strip_suffix(":443").or_else(|| host.strip_suffix(":80"))?;
            self.by_name.get(bare)
        })
    }

    /// Hosts the mirror may contact (registries' API hosts), for the `/blobs/` allow-list.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.by_name.values().filter_map(|r| r.url.host_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Registry> {
        self.by_name.values()
    }
}

impl Registry {
    /// `<base>/v2/<name>/<kind>/<reference>`.
    pub fn api_url(&self, name: &str, kind: &str, reference: &str) -> Url {
        let mut u = self.url.clone();
        let base = u.path().trim_end_matches('/').to_string();
        u.set_path(&format!("{base}/v2/{name}/{kind}/{reference}"));
        u.set_query(None);
        u
    }
}

/// The exact origins (scheme, host, port) the agent may send requests to on a client's or a
/// peer's behalf: the registries' API origins and the `--blob-host` entries. Hosts are compared
/// after the URL parser normalised them (`0x7f000001`, `127.1` and `2130706433` are all
/// `127.0.0.1`), ports always: an allowed host does not open its other ports.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// `(scheme or None for either, lowercase host, port or None for the scheme's default)`.
    list: Vec<(Option<String>, String, Option<u16>)>,
}

impl Origins {
    /// `blob_hosts` entries: `host` (its scheme's default port), `host:port` (http or https), or
    /// `scheme://host[:port]` (exactly that).
    pub fn new(registries: &Registries, blob_hosts: &[String]) -> Self {
        let mut list = Vec::new();
        for r in registries.iter() {
            if let Some(h) = r.url.host_str() {
                list.push((Some(r.url.scheme().to_string()), h.to_ascii_lowercase(), r.url.port_or_known_default()));
            }
        }
        for b in blob_hosts {
            let b = b.trim();
            if b.contains("://") {
                if let Ok(u) = Url::parse(b) {
                    if let Some(h) = u.host_str() {
                        list.push((Some(u.scheme().to_string()), h.to_ascii_lowercase(), u.port_or_known_default()));
                    }
                }
            } else if let Ok(u) = Url::parse(&format!("http://{b}")) {
                if let Some(h) = u.host_str() {
                    list.push((None, h.to_ascii_lowercase(), u.port()));
                }
            }
        }
        Self { list }
    }

    /// Whether `url` (http or https) is on one of the configured origins.
    pub fn allows(&self, url: &Url) -> bool {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else { return false };
        if !matches!(url.scheme(), "http" | "https") {
            return false;
        }
        let default = if url.scheme() == "https" { 443 } else { 80 };
        self.list.iter().any(|(scheme, h, p)| {
            scheme.as_deref().is_none_or(|s| s == url.scheme()) && h.eq_ignore_ascii_case(host) && p.unwrap_or(default) == port
        })
    }
}

/// Whether an address is one a redirect from a registry may lead to without being configured:
/// a public unicast address. Loopback, private, link-local (cloud metadata), shared,
/// benchmarking, documentation, multicast and unspecified addresses are this node's or its
/// network's own services: reaching them through the agent would make it a proxy into them.
pub fn public_address(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public_address(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80 || s[0] == 0x2001 && s[1] == 0xdb8)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {url}: redirected to {to}, which is neither a configured origin nor a public address")]
    RedirectDenied { url: String, to: String },
    #[error("upstream {url}: no response within {secs}s")]
    Timeout { url: String, secs: u64 },
    #[error("upstream {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("upstream {url}: more than {max} redirects")]
    TooManyRedirects { url: String, max: usize },
    #[error("upstream {url}: redirect without a usable Location")]
    BadRedirect { url: String },
}

/// HTTP client for upstreams. Every wait is bounded: connecting, the response head, and each read.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    head_timeout: Duration,
    connect_timeout: Duration,
    read_timeout: Duration,
    origins: Arc<Origins>,
    /// `--upstream-limit`: bytes per second read from upstream, all bodies together.
    limit: Option<Arc<RateLimit>>,
    counters: Arc<Counters>,
    /// Clients pinned to a redirect host's checked addresses, reused while the name resolves to
    /// the same addresses: a registry sends every blob (and every range of a split fetch) to its
    /// storage, and a client per request would mean a new TLS connection per request.
    pinned: Arc<std::sync::Mutex<HashMap<PinKey, reqwest::Client>>>,
}

/// A redirect host (lowercase) and the addresses it resolved to, sorted.
type PinKey = (String, Vec<std::net::SocketAddr>);

/// Pinned clients kept at most (then all are dropped and built again as needed).
const MAX_PINNED: usize = 64;

/// Reason-coded counters of upstream traffic.
#[derive(Default, Debug)]
pub struct Counters {
    /// Body bytes read from upstreams (blobs fed to the store and relayed verified).
    pub bytes: AtomicU64,
    /// URLs refused because their origin is not a configured upstream.
    pub denied: AtomicU64,
}

impl MetricsSource for Upstream {
    fn render(&self, r: &mut prometheus_client::registry::Registry) {
        counter(r, "upstream_bytes", "Bytes fetched from upstream registries and blob stores", &self.counters.bytes);
        counter(r, "proxy_denied", "Requests for hosts that are not configured upstreams", &self.counters.denied);
    }
}

/// The client's Authorization header, forwarded as is to upstream (never to another host).
pub fn authorization(h: &header::HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// `(first, last, size)` from a 206's `Content-Range: bytes first-last/size`.
pub fn content_range(resp: &reqwest::Response) -> Option<(u64, u64, u64)> {
    peerd_http::parse_content_range(resp.headers().get(header::CONTENT_RANGE)?.to_str().ok()?)
}

const MAX_REDIRECTS: usize = 5;

fn client_builder(connect_timeout: Duration, read_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .read_timeout(read_timeout)
        .user_agent(concat!("peerd/", env!("CARGO_PKG_VERSION")))
}

/// Where a redirect may go.
enum Hop {
    /// A configured origin: the shared client.
    Origin,
    /// A public host outside the configuration: a client pinned to the addresses that were
    /// checked, so the name cannot resolve to something else when it connects (DNS rebinding).
    Pinned(reqwest::Client),
    Denied,
}

impl Upstream {
    /// `limit`: bytes per second over all upstream bodies (`--upstream-limit`).
    pub fn new(connect_timeout: Duration, head_timeout: Duration, read_timeout: Duration, origins: Origins, limit: Option<u64>) -> Result<Self, reqwest::Error> {
        // One TLS provider for the whole process (ring); installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = client_builder(connect_timeout, read_timeout).build()?;
        Ok(Self {
            client,
            head_timeout,
            connect_timeout,
            read_timeout,
            origins: Arc::new(origins),
            limit: limit.map(RateLimit::new),
            counters: Arc::default(),
            pinned: Arc::default(),
        })
    }

    /// Whether `url` is a configured origin (the only places a client's URL may point); a
    /// refusal is counted.
    pub fn admits(&self, url: &Url) -> bool {
        let ok = self.origins.allows(url);
        if !ok {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// The next chunk of an upstream body, counted and paced by `--upstream-limit`.
    pub async fn chunk(&self, resp: &mut reqwest::Response) -> reqwest::Result<Option<Bytes>> {
        let c = resp.chunk().await?;
        if let Some(c) = &c {
            self.counters.bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
            if let Some(l) = &self.limit {
                l.take(c.len() as u64).await;
            }
        }
        Ok(c)
    }

    /// The rate limit relayed bodies are paced by.
    pub fn limit(&self) -> Option<Arc<RateLimit>> {
        self.limit.clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether a redirect may be followed to `url`, and with which client: a configured origin,
    /// or a host whose every address is public (registries send blob reads to storage and CDNs).
    /// A name is resolved here, checked, and the connection is pinned to those addresses.
    async fn redirect_hop(&self, url: &Url) -> Hop {
        if self.origins.allows(url) {
            return Hop::Origin;
        }
        let port = url.port_or_known_default().unwrap_or(443);
        match url.host() {
            Some(url::Host::Ipv4(ip)) if public_address(ip.into()) => Hop::Origin,
            Some(url::Host::Ipv6(ip)) if public_address(ip.into()) => Hop::Origin,
            Some(url::Host::Domain(name)) => {
                let mut addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((name, port)).await {
                    Ok(a) => a.collect(),
                    Err(_) => return Hop::Denied,
                };
                if addrs.is_empty() || !addrs.iter().all(|a| public_address(a.ip())) {
                    return Hop::Denied;
                }
                addrs.sort_unstable();
                let key = (name.to_ascii_lowercase(), addrs);
                let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = pinned.get(&key) {
                    return Hop::Pinned(c.clone());
                }
                match client_builder(self.connect_timeout, self.read_timeout).resolve_to_addrs(name, &key.1).build() {
                    Ok(c) => {
                        if pinned.len() >= MAX_PINNED {
                            pinned.clear();
                        }
                        pinned.insert(key, c.clone());
                        Hop::Pinned(c)
                    }
                    Err(_) => Hop::Denied,
                }
            }
            _ => Hop::Denied,
        }
    }

    /// Sends a request, following redirects (blob storage, signed URLs) itself so that the
    /// client's Authorization never leaves the registry's host, and no redirect target is ever
    /// remembered. A redirect is followed only to a configured origin or a public address
    /// (`redirect_hop`), pinned to the addresses checked. `headers` are forwarded as given.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        headers: &header::HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        let origin_host = url.host_str().map(str::to_owned);
        let mut url = url;
        let mut pinned: Option<reqwest::Client> = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut h = headers.clone();
            if url.host_str().map(str::to_owned) != origin_host {
                h.remove(header::AUTHORIZATION);
            }
            let client = pinned.as_ref().unwrap_or(&self.client);
            let req = client.request(method.clone(), url.clone()).headers(h);
            let resp = tokio::time::timeout(self.head_timeout, req.send())
                .await
                .map_err(|_| UpstreamError::Timeout { url: redact(&url), secs: self.head_timeout.as_secs() })?
                .map_err(|source| UpstreamError::Http { url: redact(&url), source })?;
            if !matches!(
                resp.status(),
                StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND | StatusCode::SEE_OTHER
                    | StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT
            ) {
                return Ok(resp);
            }
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| UpstreamError::BadRedirect { url: redact(&url) })?;
            pinned = match self.redirect_hop(&next).await {
                Hop::Origin => None,
                Hop::Pinned(c) => Some(c),
                Hop::Denied => return Err(UpstreamError::RedirectDenied { url: redact(&url), to: redact(&next) }),
            };
            url = next;
        }
        Err(UpstreamError::TooManyRedirects { url: redact(&url), max: MAX_REDIRECTS })
    }

    /// A HEAD that does not follow redirects: enough to learn whether the registry lets these
    /// credentials read a resource (a redirect to storage means it did; signed storage URLs are
    /// often valid for GET only).
    pub async fn check(&self, url: Url, headers: &header::HeaderMap) -> Result<reqwest::Response, UpstreamError> {
        let req = self.client.head(url.clone()).headers(headers.clone());
        tokio::time::timeout(self.head_timeout, req.send())
            .await
            .map_err(|_| UpstreamError::Timeout { url: redact(&url), secs: self.head_timeout.as_secs() })?
            .map_err(|source| UpstreamError::Http { url: redact(&url), source })
    }
}

/// A URL without its query (signed URLs carry credentials there) for logs and errors.
pub fn redact(u: &Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_by_ns_then_host() {
        let r = Registries::new(&["127.0.0.1:5000=http://127.0.0.1:5000"], true).unwrap();
        assert_eq!(r.resolve(Some("docker.io"), Some("x")).unwrap().url.as_str(), "https://registry-1.docker.io/");
        assert_eq!(r.resolve(None, Some("127.0.0.1:5000")).unwrap().name, "127.0.0.1:5000");
        assert_eq!(r.resolve(None, Some("GHCR.io:443")).unwrap().name, "ghcr.io");
        assert!(r.resolve(Some("evil.example"), Some("docker.io")).is_none(), "ns wins over Host");
        assert!(r.resolve(None, None).is_none());
        let custom = Registries::new(&["docker.io=http://10.0.0.1:5000"], true).unwrap();
        assert_eq!(custom.resolve(Some("docker.io"), None).unwrap().url.as_str(), "http://10.0.0.1:5000/");
    }

    #[test]
    fn rejects_bad_flags() {
        for bad in ["docker.io", "=http://x", "a=ftp://x", "a=not a url", "a=http://"] {
            assert!(Registries::new(&[bad], false).is_err(), "{bad}");
        }
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let regs = Registries::new(&["r=http://127.0.0.1:5000", "d=https://registry-1.docker.io"], false).unwrap();
        let o = Origins::new(&regs, &["blob.example:8080".to_string(), "store.example".to_string(), "https://s3.example:9000".to_string()]);
        let ok = |u: &str| o.allows(&Url::parse(u).unwrap());
        assert!(ok("http://127.0.0.1:5000/v2/x"));
        for same in ["http://0x7f000001:5000/x", "http://2130706433:5000/x", "http://127.1:5000/x"] {
            assert!(ok(same), "{same} is 127.0.0.1 after normalisation");
        }
        assert!(!ok("http://127.0.0.1:5001/x"), "another port of an allowed host");
        assert!(!ok("https://127.0.0.1:5000/x"), "another scheme");
        assert!(ok("https://registry-1.docker.io/v2/"));
        assert!(ok("https://REGISTRY-1.docker.io:443/v2/"));
        assert!(!ok("http://registry-1.docker.io/v2/"));
        assert!(ok("http://blob.example:8080/a") && ok("https://blob.example:8080/a"));
        assert!(!ok("http://blob.example/a"));
        assert!(ok("http://store.example/a") && ok("https://store.example/a") && !ok("http://store.example:81/a"));
        assert!(ok("https://s3.example:9000/a") && !ok("http://s3.example:9000/a"));
        assert!(!ok("http://169.254.169.254/latest"));
    }

    #[test]
    fn public_addresses() {
        for private in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1", "198.18.0.1", "224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1"] {
            assert!(!public_address(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "104.16.0.1", "2606:4700::1"] {
            assert!(public_address(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn api_urls() {
        let r = Registries::new(&["r=https://h:8443/prefix/"], false).unwrap();
        let reg = r.resolve(Some("r"), None).unwrap();
        assert_eq!(reg.api_url("a/b", "blobs", "sha256:00").as_str(), "https://h:8443/prefix/v2/a/b/blobs/sha256:00");
    }
}
