//! Certificates, built with rcgen and signed by CA keys that stay in the HSM.
//!
//! ```text
//! broker CA ──► broker TLS certificate (short-lived, key in memory)
//! terminal CA ─► terminal certificates (key in the terminal's access card)
//! user CA ────► user certificates (key = the home-card key, wrapped in the database)
//! ```

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey,
};
use rustls::pki_types::CertificateDer;
use std::time::{Duration, SystemTime};

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug)]
pub enum Usage {
    TlsServer,
    TlsClient,
    /// A server that also authenticates as a client (the broker towards markets).
    TlsServerAndClient,
    /// Signs exchange transcripts and receipts (user certificates).
    Signing,
    /// Signs documents only, with EKU id-kp-documentSigning (RFC 9336): a
    /// market's cancellation authorisations (`cancel_auth`).
    DocumentSigning,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keybroker");
    dn.push(DnType::CommonName, cn);
    dn
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

/// When a certificate is valid: from the first time to the second.
pub type Validity = (SystemTime, SystemTime);

/// From now, less 5 minutes for clock skew between hosts, for `lifetime`.
pub fn valid_for(lifetime: Duration) -> Validity {
    let now = SystemTime::now();
    (now - Duration::from_secs(300), now + lifetime)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let (not_before, not_after) = valid_for(lifetime);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
}

/// Parameters of a CA; the same ones rebuild its `Issuer` later.
pub fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial());
    validity(&mut p, Duration::from_secs(10 * 365 * 86400));
    p
}

/// A self-signed CA certificate for an HSM key; returns DER.
pub fn self_signed_ca(cn: &str, key: &impl SigningKey) -> Result<Vec<u8>> {
    let cert = ca_params(cn)
        .self_signed(key)
        .context("signing CA certificate")?;
    Ok(cert.der().to_vec())
}

/// Issues a leaf certificate for `subject_key`, signed by `ca_der`'s key,
/// valid from now for `lifetime`.
pub fn issue(
    ca_der: &[u8],
    ca_key: &impl SigningKey,
    cn: &str,
    sans: &[String],
    usage: Usage,
    lifetime: Duration,
    subject_key: &impl PublicKeyData,
) -> Result<Vec<u8>> {
    let validity = valid_for(lifetime);
    issue_valid(ca_der, ca_key, cn, sans, usage, validity, subject_key)
}

/// As [`issue`], valid for the given times (fixed ones make the test
/// vectors' certificates hold at the vectors' times).
pub fn issue_valid(
    ca_der: &[u8],
    ca_key: &impl SigningKey,
    cn: &str,
    sans: &[String],
    usage: Usage,
    (not_before, not_after): Validity,
    subject_key: &impl PublicKeyData,
) -> Result<Vec<u8>> {
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca_der), ca_key)
        .context("parsing CA certificate")?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = match usage {
        Usage::TlsServer => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::TlsClient => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::TlsServerAndClient => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Usage::Signing => vec![],
        Usage::DocumentSigning => vec![ExtendedKeyUsagePurpose::Other(
            crate::cancel_auth::EKU_DOCUMENT_SIGNING_ARCS.to_vec(),
        )],
    };
    for san in sans {
        p.subject_alt_names.push(match san.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.clone().try_into().context("SAN")?),
        });
    }
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    let cert = p
        .signed_by(subject_key, &issuer)
        .context("signing certificate")?;
    Ok(cert.der().to_vec())
}

pub fn pem(tag: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(tag, der.to_vec()))
}

/// SHA-256 of a DER certificate: the key terminals are looked up by.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    d.as_ref().try_into().expect("32 bytes")
}

/// The first certificate in a PEM file, as DER.
pub fn read_cert_pem(text: &str) -> Result<Vec<u8>> {
    let mut rd = text.as_bytes();
    let cert = rustls_pemfile::certs(&mut rd)
        .next()
        .context("no certificate in PEM")?
        .context("bad PEM")?;
    Ok(cert.to_vec())
}
