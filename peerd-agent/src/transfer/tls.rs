//! Mutual TLS between agents, from the cluster secret alone: every agent derives the same cluster
//! CA key from the secret, and issues itself a fresh node certificate signed by it at start. A
//! peer is accepted only if its certificate chains to that CA, so only holders of the secret can
//! talk to us (and we only talk to them).
//!
//! Each agent builds its own CA certificate from the shared key and name; certificates differ in
//! bytes (serials, dates) but a node certificate verifies against any of them, since verification
//! uses the issuer name and the CA's public key.
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The name every node certificate carries and every client checks.
pub const SERVER_NAME: &str = "peerd.cluster";
/// ALPN of the piece protocol (see PROTOCOL.md); bump with the wire version.
pub const ALPN: &[u8] = b"peerd/1";
/// ALPN of the bulk piece channel on TCP (PROTOCOL.md, "Bulk channel").
pub const BULK_ALPN: &[u8] = b"peerd-bulk/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cluster secret is too short ({0} bytes; at least 16)")]
    WeakSecret(usize),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// This node's credentials.
pub struct Identity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// PKCS#8 v1 wrapping of a raw Ed25519 seed (RFC 8410): a fixed prefix, then the 32 bytes.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    der.extend_from_slice(seed);
    der
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "peerd cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    p
}

impl Identity {
    /// Derives the cluster CA from `secret` and issues a certificate for this node.
    pub fn new(secret: &[u8], node_id: &str) -> Result<Self, TlsError> {
        if secret.len() < 16 {
            return Err(TlsError::WeakSecret(secret.len()));
        }
        let seed = blake3::derive_key("peerd 2026 cluster CA ed25519 seed v1", secret);
        let ca_key = KeyPair::try_from(ed25519_pkcs8(&seed).as_slice())?;
        let params = ca_params();
        let ca_cert = params.self_signed(&ca_key)?;
        let issuer = Issuer::new(params, ca_key);

        let node_key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut np = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        np.distinguished_name.push(DnType::CommonName, node_id);
        let node_cert = np.signed_by(&node_key, &issuer)?;
        Ok(Self {
            ca: ca_cert.der().clone(),
            chain: vec![node_cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(node_key.serialize_der()),
        })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// ring's suites with AES-128-GCM first (ring lists AES-256-GCM first). Every byte between
    /// peers is encrypted in userspace, and AES-128 runs 10 rounds to AES-256's 14; both ends use
    /// this provider, so a pair of agents agrees on it (bench/RESULTS.md, transport).
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        Arc::new(p)
    }

    /// Server side: requires a client certificate from the same cluster CA.
    fn rustls_server(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }

    /// Client side: presents our certificate, accepts only servers from the same cluster CA.
    fn rustls_client(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }

    /// The QUIC endpoint's server side.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(self.rustls_server(ALPN)?).map_err(|e| TlsError::Quic(e.to_string()))?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
    }

    /// The QUIC endpoint's client side.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(self.rustls_client(ALPN)?).map_err(|e| TlsError::Quic(e.to_string()))?;
        Ok(quinn::ClientConfig::new(Arc::new(quic)))
    }

    /// The bulk channel's (TLS on TCP, `bulk`) server side: the same CA, certificates and suites.
    pub fn bulk_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        Ok(Arc::new(self.rustls_server(BULK_ALPN)?))
    }

    /// The bulk channel's client side.
    pub fn bulk_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        Ok(Arc::new(self.rustls_client(BULK_ALPN)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_prefer_aes_128_gcm_and_keep_the_other_tls13_suites() {
        let p = Identity::provider();
        let suites: Vec<rustls::CipherSuite> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, "{suites:?}");
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384), "{suites:?}");
        assert_eq!(suites.len(), rustls::crypto::ring::default_provider().cipher_suites.len());
    }
}
