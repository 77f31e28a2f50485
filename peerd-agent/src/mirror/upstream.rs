//! Upstream registries and blob stores: which ones exist, and a bounded HTTP client for them.
use std::{collections::HashMap, time::Duration};

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

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
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
}

const MAX_REDIRECTS: usize = 5;

impl Upstream {
    pub fn new(connect_timeout: Duration, head_timeout: Duration, read_timeout: Duration) -> Result<Self, reqwest::Error> {
        // One TLS provider for the whole process (ring); installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .user_agent(concat!("peerd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, head_timeout })
    }

    /// Sends a request, following redirects (blob storage, signed URLs) itself so that the
    /// client's Authorization never leaves the registry's host, and no redirect target is ever
    /// remembered. `headers` are forwarded as given.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        headers: &header::HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        let origin_host = url.host_str().map(str::to_owned);
        let mut url = url;
        for _ in 0..=MAX_REDIRECTS {
            let mut h = headers.clone();
            if url.host_str().map(str::to_owned) != origin_host {
                h.remove(header::AUTHORIZATION);
            }
            let req = self.client.request(method.clone(), url.clone()).headers(h);
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
    fn api_urls() {
        let r = Registries::new(&["r=https://h:8443/prefix/"], false).unwrap();
        let reg = r.resolve(Some("r"), None).unwrap();
        assert_eq!(reg.api_url("a/b", "blobs", "sha256:00").as_str(), "https://h:8443/prefix/v2/a/b/blobs/sha256:00");
    }
}
