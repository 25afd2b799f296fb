//! The terminal CA's signature over a terminal certificate, checked once.
//!
//! A full handshake with a client certificate makes the broker verify two
//! ECDSA signatures: the CA's over the certificate (the chain) and the
//! terminal's over the handshake (CertificateVerify, the proof that the
//! terminal holds the key). The first is a pure function of the
//! certificate's bytes and the clock, and terminals reconnect with the same
//! certificate all day. So a chain that verified is remembered, by the
//! SHA-256 of its exact DER, until the certificate's `notAfter` (at most
//! [`TTL`]); the proof of possession is verified on every handshake.
//!
//! Revocation is unaffected: the broker does not take revocation from the
//! chain but from the registry, looked up by fingerprint at every login.
//! The memo is bounded ([`MAX_ENTRIES`]; full, it starts over).

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How long a verified chain is trusted without verifying it again.
pub const TTL: u64 = 3600;
/// Chains remembered at most.
pub const MAX_ENTRIES: usize = 65_536;

#[derive(Debug)]
pub struct CachingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    memo: Memo,
}

impl CachingVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self {
            inner,
            memo: Memo::default(),
        }
    }
}

/// SHA-256 of a presented chain → valid until (Unix seconds).
#[derive(Debug, Default)]
struct Memo(Mutex<HashMap<[u8; 32], u64>>);

impl Memo {
    /// `verify` unless this exact chain verified before and is still within
    /// its memo's life.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<ClientCertVerified, Error>,
    ) -> Result<ClientCertVerified, Error> {
        let key = chain_key(end_entity, intermediates);
        let t = now.as_secs();
        let hit = self
            .0
            .lock()
            .expect("verified chains")
            .get(&key)
            .is_some_and(|&until| t < until);
        if hit {
            return Ok(ClientCertVerified::assertion());
        }
        let ok = verify()?;
        if let Some(end) = not_after(end_entity) {
            let mut map = self.0.lock().expect("verified chains");
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert(key, end.min(t + TTL));
        }
        Ok(ok)
    }
}

fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for c in std::iter::once(end_entity).chain(intermediates) {
        h.update(&(c.len() as u64).to_be_bytes());
        h.update(c);
    }
    h.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The certificate's `notAfter`, Unix seconds.
fn not_after(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

impl ClientCertVerifier for CachingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.memo.check(end_entity, intermediates, now, || {
            self.inner
                .verify_client_cert(end_entity, intermediates, now)
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn cert(days: i64) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::new(vec!["t".into()]).unwrap();
        p.not_after = rcgen::date_time_ymd(2026, 1, 1) + time::Duration::days(days);
        let k = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&k).unwrap().der().clone()
    }

    #[test]
    fn a_chain_is_verified_once_until_it_expires_and_a_changed_one_again() {
        let memo = Memo::default();
        let calls = Cell::new(0);
        let check = |c: &CertificateDer<'_>, s: u64| {
            let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(s));
            memo.check(c, &[], at, || {
                calls.set(calls.get() + 1);
                Ok(ClientCertVerified::assertion())
            })
            .unwrap();
            calls.get()
        };
        let jan1 = rcgen::date_time_ymd(2026, 1, 1).unix_timestamp() as u64;
        let a = cert(10);
        assert_eq!(check(&a, jan1), 1);
        assert_eq!(check(&a, jan1 + 60), 1);
        // After the TTL, and for other bytes, the inner verifier decides.
        assert_eq!(check(&a, jan1 + TTL + 1), 2);
        assert_eq!(check(&cert(10), jan1), 3);
        // Never past notAfter.
        let short = cert(0);
        assert_eq!(check(&short, jan1 - 30), 4);
        assert_eq!(check(&short, jan1 + 1), 5);
        // A refused chain is not remembered.
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(jan1));
        let b = cert(10);
        let refuse = || Err(Error::General("refused".into()));
        assert!(memo.check(&b, &[], at, refuse).is_err());
        assert!(memo.check(&b, &[], at, refuse).is_err());
    }
}
