//! The broker's TLS identity: a short-lived key in memory, certified by the
//! broker CA key that never leaves the HSM (the idea of RFC 9345 delegated
//! credentials, with an ordinary X.509 leaf so any TLS 1.3 terminal works).
//!
//! ```text
//! start / every tls_cert_hours/2:  aws-lc-rs keygen ─► rcgen leaf ─► HSM signs (broker CA) ─► resolver
//! each handshake:                  rustls CertificateVerify ─► in-memory key (no HSM round trip)
//! ```
//!
//! See docs/DECISIONS.md ("TLS identity") for the measurement behind this.

use crate::hsm::signer::HsmSigner;
use crate::hsm::{Hsm, ops};
use crate::pki::{self, Usage};
use anyhow::{Context, Result};
use cryptoki::object::{ObjectClass, ObjectHandle};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use crate::net::tls_io::provider;

/// Serves the current certified key; swapped on rotation.
#[derive(Debug)]
pub struct RotatingCert(RwLock<Arc<CertifiedKey>>);

impl RotatingCert {
    pub fn new(ck: Arc<CertifiedKey>) -> Self {
        Self(RwLock::new(ck))
    }
    pub fn set(&self, ck: Arc<CertifiedKey>) {
        *self.0.write().expect("cert lock") = ck;
    }
}

impl rustls::client::ResolvesClientCert for RotatingCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("cert lock").clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("cert lock").clone())
    }
}

/// What it takes to certify a fresh TLS key with the HSM's broker CA key.
#[derive(Clone)]
pub struct Certifier {
    pub ca_der: Vec<u8>,
    pub ca_key: ObjectHandle,
    pub ca_point: Vec<u8>,
    pub names: Vec<String>,
    pub lifetime: Duration,
}

impl Certifier {
    /// A new in-memory key and its certificate, signed in the HSM.
    pub fn issue(
        &self,
        session: &cryptoki::session::Session,
        provider: &CryptoProvider,
    ) -> Result<Arc<CertifiedKey>> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signer = HsmSigner {
            session,
            key: self.ca_key,
            point: self.ca_point.clone(),
        };
        let leaf = pki::issue(
            &self.ca_der,
            &signer,
            "keybroker broker",
            &self.names,
            Usage::TlsServerAndClient,
            self.lifetime,
            &key,
        )?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider
            .key_provider
            .load_private_key(der)
            .context("loading TLS key")?;
        Ok(Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(leaf)],
            signing,
        )))
    }

    /// Re-issues the TLS key every half lifetime on a thread of its own,
    /// with its own HSM session.
    pub fn spawn_rotation(
        self,
        hsm: Arc<Hsm>,
        resolver: Arc<RotatingCert>,
        provider: Arc<CryptoProvider>,
    ) {
        std::thread::Builder::new()
            .name("tls-rotate".into())
            .spawn(move || {
                let mut this = self;
                loop {
                    std::thread::sleep(this.lifetime / 2);
                    // The CA key's handle may have changed if the HSM
                    // recovered from a fault since the last rotation.
                    let issued = hsm.session().map_err(anyhow::Error::from).and_then(|s| {
                        let label = crate::hsm::labels::BROKER_CA;
                        if let Some(k) = hsm.find(&s, label, ObjectClass::PRIVATE_KEY)? {
                            this.ca_key = k;
                        }
                        this.issue(&s, &provider)
                    });
                    match issued {
                        Ok(ck) => {
                            resolver.set(ck);
                            tracing::info!("rotated the broker TLS key");
                        }
                        Err(e) => tracing::error!(error = %e, "TLS key rotation failed; keeping the current key"),
                    }
                }
            })
            .expect("spawning rotation thread");
    }
}

/// TLS 1.3 only, client certificates from the terminal CA required,
/// stateless session tickets.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    terminal_ca_der: &[u8],
    resolver: Arc<RotatingCert>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(terminal_ca_der.to_vec()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("client verifier")?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(super::verify_cache::CachingVerifier::new(
            verifier,
        )))
        .with_cert_resolver(resolver);
    // The broker's suite order wins (see `provider`).
    cfg.ignore_client_order = true;
    cfg.ticketer = ticketer;
    // One ticket: a terminal resumes one connection at a time, and each
    // resumption brings a fresh ticket (a ticket resumes once on a node:
    // broker/tickets.rs).
    cfg.send_tls13_tickets = 1;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}

/// The broker's client configuration towards one market: the market's CA
/// as the only trust anchor, the broker's current TLS key as client identity.
pub fn market_client(
    provider: Arc<CryptoProvider>,
    market_ca_pem: &str,
    identity: Arc<RotatingCert>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in crate::pki::certs_pem(market_ca_pem.as_bytes())? {
        roots.add(c)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(identity);
    Ok(Arc::new(cfg))
}

/// Loads the broker CA's public point for the certifier.
pub fn certifier(
    hsm: &Hsm,
    session: &cryptoki::session::Session,
    ca_der: Vec<u8>,
    ca_key: ObjectHandle,
    names: Vec<String>,
    hours: u64,
) -> Result<Certifier> {
    Ok(Certifier {
        ca_der,
        ca_key,
        ca_point: ops::public_point(session, crate::hsm::labels::BROKER_CA)
            .with_context(|| format!("broker CA public key on token {}", hsm.token()))?,
        names,
        lifetime: Duration::from_secs(hours * 3600),
    })
}
