//! TLS interception for transparent mode (opt-in `--tls-intercept`): the cluster's intercept CA,
//! certificates minted per registry name, and reading the SNI of a ClientHello.
//!
//! eBPF redirects a node's connections to a registry to the agent. A TLS connection is relayed
//! untouched unless the operator opted in and the nodes trust the intercept CA; then the agent
//! terminates TLS itself with a leaf for the name the client asked for (its SNI, or the original
//! destination IP when there is none).
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The most bytes [`client_hello_sni`] looks at: one full TLS record (or several smaller ones
/// holding the same handshake). A caller that buffers this much always gets an answer other than
/// [`Sni::NeedMore`].
pub const MAX_CLIENT_HELLO: usize = 5 + 16384;

/// What the first bytes of a connection say about the name the client wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// The ClientHello is not complete yet: read more (up to [`MAX_CLIENT_HELLO`] in all).
    NeedMore,
    /// Not a TLS ClientHello this parser accepts (or malformed): relay the bytes untouched.
    NotTls,
    /// A ClientHello without a host name (clients send none for IP addresses).
    NoName,
    /// The host name from the server_name extension, as sent.
    Name(String),
}

/// Whether a connection's first byte is a TLS handshake record, so it is worth buffering a
/// ClientHello instead of treating the stream as plain HTTP.
pub fn looks_like_tls(first: u8) -> bool {
    first == 0x16
}

/// Reads the SNI from the start of a connection. The handshake may span several records; it must
/// fit in [`MAX_CLIENT_HELLO`] bytes of input. Never panics, whatever `buf` holds.
pub fn client_hello_sni(buf: &[u8]) -> Sni {
    let buf = &buf[..buf.len().min(MAX_CLIENT_HELLO)];
    let more = |needed: usize| if needed > MAX_CLIENT_HELLO { Sni::NotTls } else { Sni::NeedMore };
    let mut hs: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let rec = buf.get(at..).unwrap_or_default();
        // Record header: type 22 (handshake), version 3.0..=3.4 (3.1 is what everyone sends).
        let bad = rec.first().is_some_and(|&t| !looks_like_tls(t))
            || rec.get(1).is_some_and(|&v| v != 3)
            || rec.get(2).is_some_and(|&v| v > 4);
        if bad {
            return Sni::NotTls;
        }
        let (Some(&hi), Some(&lo)) = (rec.get(3), rec.get(4)) else { return more(at + 5) };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len == 0 || len > 16384 {
            return Sni::NotTls; // empty handshake fragments are forbidden (RFC 8446 5.1)
        }
        let Some(body) = rec.get(5..5 + len) else { return more(at + 5 + len) };
        hs.extend_from_slice(body);
        at += 5 + len;
        if let [kind, a, b, c, ..] = hs[..] {
            let need = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
            // Not a ClientHello, something coalesced after it, or more than we would buffer.
            if kind != 1 || hs.len() > need || need > MAX_CLIENT_HELLO - 5 {
                return Sni::NotTls;
            }
            if hs.len() == need {
                return match hello_name(&hs[4..]) {
                    None => Sni::NotTls,
                    Some(None) => Sni::NoName,
                    Some(Some(name)) => Sni::Name(name),
                };
            }
        }
    }
}

/// Bounds-checked reader over TLS wire structures.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.take(1)?[0];
        self.take(usize::from(n))
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The ClientHello body (RFC 8446 4.1.2): `None` if malformed, `Some(None)` if it names no host.
fn hello_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    if r.take(2)?[0] != 3 {
        return None;
    }
    r.take(32)?; // random
    let session = r.vec8()?;
    let suites = r.vec16()?;
    let compression = r.vec8()?;
    if session.len() > 32 || suites.is_empty() || suites.len() % 2 != 0 || compression.is_empty() {
        return None;
    }
    if r.0.is_empty() {
        return Some(None); // no extensions at all (old clients)
    }
    let mut exts = Reader(r.vec16()?);
    if !r.0.is_empty() {
        return None;
    }
    let mut name = None;
    let mut seen = false;
    while !exts.0.is_empty() {
        let (kind, data) = (exts.u16()?, exts.vec16()?);
        if kind == 0 {
            if seen {
                return None; // duplicate extension
            }
            seen = true;
            name = server_name(data)?;
        }
    }
    Some(name)
}

/// The server_name extension (RFC 6066 3): one host_name at most, printable ASCII.
fn server_name(data: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16()?);
    if !r.0.is_empty() {
        return None;
    }
    let mut host = None;
    while !list.0.is_empty() {
        let (kind, name) = (list.take(1)?[0], list.vec16()?);
        if kind == 0 {
            if host.is_some() || name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
                return None;
            }
            host = Some(String::from_utf8(name.to_vec()).ok()?);
        }
    }
    Some(host)
}

/// Why the intercept CA could not be created, loaded or used; messages name the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} already exists; refusing to overwrite the intercept CA key (nodes trust its certificate). Use it, or remove the directory's ca.key and ca.crt and distribute the new ca.crt", .0.display())]
    KeyExists(PathBuf),
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{} does not match the certificate {}: restore the matching pair, or remove both to make a new CA", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("cannot mint a certificate for {0:?}: neither a DNS name nor an IP address")]
    BadName(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

const CA_NAME: &str = "peerd intercept CA";
const DAY: Duration = Duration::from_secs(86_400);
/// Leaves are cheap to mint; short-lived ones limit what a leaked leaf key is worth.
const LEAF_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
const REMINT_AFTER: Duration = Duration::from_secs(7 * 86_400);
const CACHE_MAX: usize = 1024;

/// The cluster's intercept CA (ECDSA P-256, which every TLS client accepts, Go's included).
pub struct InterceptCa {
    dir: PathBuf,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Server configs per normalised name, with when they were minted.
    cache: Mutex<HashMap<String, (Instant, Arc<rustls::ServerConfig>)>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InterceptError + '_ {
    move |source| InterceptError::Io { path: path.to_path_buf(), source }
}

/// Params with both dates now (rcgen's date type is from `time`, which we do not depend on).
fn params_now() -> CertificateParams {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut p = CertificateParams::default();
    p.not_before = rcgen::date_time_ymd(1970, 1, 1) + since;
    p.not_after = p.not_before;
    p
}

fn ca_params() -> CertificateParams {
    let mut p = params_now();
    p.not_before -= DAY;
    p.not_after = p.not_before + 3653 * DAY;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// One DER element: (tag, the whole element, its contents, the rest). Definite lengths only.
type Der<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

fn der(b: &[u8]) -> Option<Der<'_>> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x83 => {
            let (bytes, rest) = rest.split_at_checked(usize::from(first & 0x7f))?;
            (bytes.iter().fold(0, |a, &x| a << 8 | usize::from(x)), rest)
        }
        _ => return None,
    };
    let (contents, after) = rest.split_at_checked(len)?;
    Some((tag, b.get(..b.len() - after.len())?, contents, after))
}

/// A certificate's subject and SubjectPublicKeyInfo, as DER (RFC 5280 4.1). rcgen cannot parse
/// certificates without x509-parser, which this crate does not depend on.
fn subject_and_spki(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, _, body, _) = der(cert)?;
    let (_, _, mut tbs, _) = der(body)?;
    let mut fields = Vec::new();
    while let Some((tag, whole, _, next)) = der(tbs) {
        fields.push((tag, whole));
        tbs = next;
    }
    // [0] version (optional), serial, signature, issuer, validity, subject, spki
    let fields = if fields.first()?.0 == 0xa0 { &fields[1..] } else { &fields[..] };
    Some((fields.get(4)?.1, fields.get(5)?.1))
}

impl InterceptCa {
    /// Generates a new CA into `dir` (`ca.crt`, and `ca.key` with mode 0600). Refuses to replace
    /// an existing key: nodes were told to trust its certificate.
    pub fn create(dir: &Path) -> Result<Self, InterceptError> {
        let (crt_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if key_path.exists() {
            return Err(InterceptError::KeyExists(key_path));
        }
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params();
        let pem = params.self_signed(&key)?.pem();
        // The key is linked into place (atomic, never overwrites) before the certificate, so two
        // racing creators cannot leave a certificate that does not match the key.
        write_tmp(dir, "ca.key", key.serialize_pem().as_bytes(), |tmp| match fs::hard_link(tmp, &key_path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(InterceptError::KeyExists(key_path.clone())),
            r => r.map_err(io(&key_path)),
        })?;
        write_tmp(dir, "ca.crt", pem.as_bytes(), |tmp| fs::rename(tmp, &crt_path).map_err(io(&crt_path)))?;
        Ok(Self::new(dir, pem, Issuer::new(params, key)))
    }

    /// Loads `dir/ca.crt` and `dir/ca.key`, checking that they belong together.
    pub fn load(dir: &Path) -> Result<Self, InterceptError> {
        let (crt_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        let invalid = |path: &Path, reason: String| InterceptError::Invalid { path: path.to_path_buf(), reason };
        let pem = fs::read_to_string(&crt_path).map_err(io(&crt_path))?;
        let cert = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| invalid(&crt_path, format!("not a PEM certificate ({e})")))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| invalid(&key_path, format!("not a PEM private key ({e})")))?;
        if fs::metadata(&key_path).map_err(io(&key_path))?.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %key_path.display(), "intercept CA key is readable by group or others; chmod 600 it");
        }
        let (subject, spki) =
            subject_and_spki(&cert).ok_or_else(|| invalid(&crt_path, "malformed certificate".into()))?;
        if spki != key.subject_public_key_info() {
            return Err(InterceptError::KeyMismatch { key: key_path, cert: crt_path });
        }
        // Leaves name their issuer by our subject; a CA with another subject would not chain.
        let params = ca_params();
        let ours = params.self_signed(&key)?;
        if subject_and_spki(ours.der()).map(|s| s.0) != Some(subject) {
            return Err(invalid(&crt_path, format!("not a CA made by peerd (subject is not CN={CA_NAME})")));
        }
        Ok(Self::new(dir, pem, Issuer::new(params, key)))
    }

    /// Loads the CA in `dir`, or creates it if there is no key yet; `true` if created.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), InterceptError> {
        if dir.join("ca.key").exists() {
            return Ok((Self::load(dir)?, false));
        }
        match Self::create(dir) {
            Err(InterceptError::KeyExists(_)) => Ok((Self::load(dir)?, false)), // lost a race
            r => Ok((r?, true)),
        }
    }

    fn new(dir: &Path, pem: String, issuer: Issuer<'static, KeyPair>) -> Self {
        Self { dir: dir.to_path_buf(), pem, issuer, cache: Mutex::new(HashMap::new()) }
    }

    /// The CA certificate, PEM: what nodes must trust.
    pub fn ca_pem(&self) -> &str {
        &self.pem
    }

    /// Where the CA certificate is, to tell operators what to distribute to nodes.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A server config presenting a leaf for `name` (a DNS name, or an IPv4/IPv6 literal,
    /// optionally in brackets). Cached per name; re-minted weekly, well before the leaf expires.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, InterceptError> {
        let (norm, san) = parse_name(name)?;
        // Minting under the lock: a burst of connections to a new name mints one leaf, not many.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, cfg)) = cache.get(&norm) {
            if at.elapsed() < REMINT_AFTER {
                return Ok(cfg.clone());
            }
        }
        let cfg = self.mint(&norm, san)?;
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(norm, (Instant::now(), cfg.clone()));
        Ok(cfg)
    }

    fn mint(&self, name: &str, san: SanType) -> Result<Arc<rustls::ServerConfig>, InterceptError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = params_now();
        p.not_before -= Duration::from_secs(3600);
        p.not_after += LEAF_VALIDITY;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, if name.len() <= 64 { name } else { "peerd intercept" });
        p.subject_alt_names = vec![san];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Writes `bytes` to a fresh 0600 temp file in `dir`, then hands it to `place` (rename or link).
fn write_tmp(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    place: impl FnOnce(&Path) -> Result<(), InterceptError>,
) -> Result<(), InterceptError> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp); // a leftover from a crash
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    let r = f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io(&tmp)).and_then(|()| place(&tmp));
    let _ = fs::remove_file(&tmp); // after a rename it is gone; after a link it is a second name
    r
}

/// The cache key and SAN for a name; DNS names are case-insensitive and may end in a dot.
fn parse_name(name: &str) -> Result<(String, SanType), InterceptError> {
    let bad = || InterceptError::BadName(name.to_string());
    let ip = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(inner) => Some(IpAddr::V6(inner.parse::<Ipv6Addr>().map_err(|_| bad())?)),
        None => name.parse::<IpAddr>().ok(),
    };
    if let Some(ip) = ip {
        return Ok((ip.to_string(), SanType::IpAddress(ip)));
    }
    let dns = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    DnsName::try_from(dns.as_str()).map_err(|_| bad())?;
    let san = SanType::DnsName(Ia5String::try_from(dns.clone()).map_err(|_| bad())?);
    Ok((dns, san))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ring() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The first flight a real rustls client sends for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let cfg = rustls::ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from(name.to_string()).unwrap()).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// The same handshake bytes, re-framed as records of at most `size` bytes.
    fn reframe(hello: &[u8], size: usize) -> Vec<u8> {
        hello[5..].chunks(size).flat_map(|c| [&[0x16, 3, 1][..], &(c.len() as u16).to_be_bytes(), c].concat()).collect()
    }

    #[test]
    fn sni_from_a_real_client_hello() {
        let hello = client_hello("registry.example");
        assert_eq!(client_hello_sni(&hello), Sni::Name("registry.example".into()));
        assert_eq!(client_hello_sni(&client_hello("198.18.255.1")), Sni::NoName);
        assert_eq!(client_hello_sni(&reframe(&hello, 100)), Sni::Name("registry.example".into()));
        assert!(looks_like_tls(hello[0]) && !looks_like_tls(b'G'));
    }

    #[test]
    fn every_prefix_needs_more() {
        for hello in [client_hello("registry.example"), reframe(&client_hello("registry.example"), 50)] {
            for n in 0..hello.len() {
                assert_eq!(client_hello_sni(&hello[..n]), Sni::NeedMore, "prefix {n}");
            }
        }
    }

    #[test]
    fn not_tls() {
        assert_eq!(client_hello_sni(b"GET /v2/ HTTP/1.1\r\n"), Sni::NotTls);
        assert_eq!(client_hello_sni(&[0x16, 2]), Sni::NotTls);
        assert_eq!(client_hello_sni(&[0x16, 3, 1, 0, 0]), Sni::NotTls);
        assert_eq!(client_hello_sni(&[0x16, 3, 1, 0x40, 1]), Sni::NotTls); // longer than a record
        let mut hello = client_hello("registry.example");
        hello[5] = 2; // a ServerHello
        assert_eq!(client_hello_sni(&hello), Sni::NotTls);
        // A handshake announced as longer than the cap is refused before it is all there.
        assert_eq!(client_hello_sni(&[0x16, 3, 1, 0, 4, 1, 0x01, 0, 0]), Sni::NotTls);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(mut v in prop::collection::vec(any::<u8>(), 0..2048), header in any::<bool>()) {
            if header && v.len() > 5 {
                v[..3].copy_from_slice(&[0x16, 3, 1]);
            }
            client_hello_sni(&v);
        }

        #[test]
        fn mutated_hellos_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut hello = client_hello("registry.example");
            let i = at.index(hello.len());
            hello[i] = byte;
            client_hello_sni(&hello[..cut.index(hello.len() + 1)]);
        }
    }

    #[test]
    fn create_then_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let (ca, created) = InterceptCa::load_or_create(&dir).unwrap();
        assert!(created);
        assert_eq!(ca.ca_path(), dir.join("ca.crt"));
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(dir.join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2, "no temp files left behind");
        let (again, created) = InterceptCa::load_or_create(&dir).unwrap();
        assert!(!created);
        assert_eq!(again.ca_pem(), ca.ca_pem());
        assert!(matches!(InterceptCa::create(&dir), Err(InterceptError::KeyExists(_))));
    }

    #[test]
    fn load_rejects_mismatch_and_garbage() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        InterceptCa::create(a.path()).unwrap();
        InterceptCa::create(b.path()).unwrap();
        fs::copy(b.path().join("ca.key"), a.path().join("ca.key")).unwrap();
        let err = InterceptCa::load(a.path()).err().unwrap();
        assert!(matches!(err, InterceptError::KeyMismatch { .. }), "{err}");
        fs::write(a.path().join("ca.crt"), "junk").unwrap();
        let err = InterceptCa::load(a.path()).err().unwrap();
        assert!(err.to_string().contains("ca.crt"), "{err}");
        // A matching pair with another subject: leaves would name an issuer that is not it.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut other = ca_params();
        other.distinguished_name.push(DnType::CommonName, "someone else's CA");
        fs::write(a.path().join("ca.crt"), other.self_signed(&key).unwrap().pem()).unwrap();
        fs::write(a.path().join("ca.key"), key.serialize_pem()).unwrap();
        let err = InterceptCa::load(a.path()).err().unwrap();
        assert!(err.to_string().contains("not a CA made by peerd"), "{err}");
        fs::remove_file(b.path().join("ca.crt")).unwrap();
        let err = InterceptCa::load(b.path()).err().unwrap();
        assert!(matches!(&err, InterceptError::Io { path, .. } if path.ends_with("ca.crt")), "{err}");
    }

    #[test]
    fn names() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = InterceptCa::create(tmp.path()).unwrap();
        for bad in ["", "a b", "*.example", "[198.18.0.1]", "exa_mple..com", "1.2.3.4.5"] {
            assert!(matches!(ca.server_config(bad), Err(InterceptError::BadName(_))), "{bad:?}");
        }
        let one = ca.server_config("Registry.Example.").unwrap();
        assert!(Arc::ptr_eq(&one, &ca.server_config("registry.example").unwrap()));
        assert!(Arc::ptr_eq(&ca.server_config("[::1]").unwrap(), &ca.server_config("::1").unwrap()));
    }

    /// A TLS handshake and a byte round trip: a leaf minted for `cert_name`, a client that trusts
    /// only the CA and expects `expect`.
    async fn round_trip(ca: &InterceptCa, cert_name: &str, expect: &str, tls12: bool) -> std::io::Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(cert_name).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.ca_pem().as_bytes()).unwrap()).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] =
            if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
        let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = ServerName::try_from(expect.to_string()).unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = async move {
            let mut tls = acceptor.accept(s).await?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            let mut buf = [0; 5];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await
        };
        let client = async move {
            let mut tls = connector.connect(name, c).await?;
            tls.write_all(b"hello").await?;
            tls.flush().await?;
            let mut buf = [0; 5];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"hello");
            Ok(())
        };
        let (s, c) = tokio::join!(server, client);
        c.and(s)
    }

    #[tokio::test]
    async fn handshakes() {
        let tmp = tempfile::tempdir().unwrap();
        InterceptCa::create(tmp.path()).unwrap();
        let ca = InterceptCa::load(tmp.path()).unwrap(); // leaves from a loaded CA must chain too
        for tls12 in [false, true] {
            round_trip(&ca, "registry.example", "registry.example", tls12).await.unwrap();
            round_trip(&ca, "198.18.255.1", "198.18.255.1", tls12).await.unwrap();
            round_trip(&ca, "[2001:db8::1]", "2001:db8::1", tls12).await.unwrap();
            assert!(round_trip(&ca, "registry.example", "other.example", tls12).await.is_err());
            assert!(round_trip(&ca, "198.18.255.1", "198.18.255.2", tls12).await.is_err());
        }
    }
}
