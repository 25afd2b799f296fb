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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer,
};
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

/// The subject's common name of a DER certificate, if it parses and has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_owned())
}

/// SHA-256 of a DER certificate: the key terminals are looked up by.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    d.as_ref().try_into().expect("32 bytes")
}

/// Checks that `leaf` is valid now for `usage` and issued by `ca`, a CA
/// certificate that is itself valid now.
///
/// webpki checks the leaf as rustls checks a TLS peer's: the CA's
/// signature, notBefore/notAfter, that it is not a CA certificate itself,
/// the extended key usage (`usage`), a signature algorithm it supports, and
/// the CA's name constraints. webpki takes a trust anchor as a name and a
/// key only and reads none of its extensions or dates, so the CA
/// certificate's basicConstraints (cA), key usage (keyCertSign, when
/// present) and validity are checked here, as OpenSSL checks a root's.
pub fn verify_issued(
    leaf: &[u8],
    ca: &[u8],
    usage: webpki::KeyUsage,
    now: rustls::pki_types::UnixTime,
) -> Result<()> {
    check_ca(ca, now)?;
    chains_to(leaf, ca, usage, now)
}

/// webpki's half of [`verify_issued`].
fn chains_to(
    leaf: &[u8],
    ca: &[u8],
    usage: webpki::KeyUsage,
    now: rustls::pki_types::UnixTime,
) -> Result<()> {
    let ca = CertificateDer::from(ca);
    let anchor = webpki::anchor_from_trusted_cert(&ca).context("CA certificate")?;
    let leaf = CertificateDer::from(leaf);
    webpki::EndEntityCert::try_from(&leaf)
        .context("certificate")?
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            now,
            usage,
            None,
            None,
        )
        .context("certificate chain")?;
    Ok(())
}

/// A CA certificate fit to issue: basicConstraints cA, keyCertSign if it
/// has a key usage extension, and within its validity at `now`.
pub fn check_ca(der: &[u8], now: rustls::pki_types::UnixTime) -> Result<()> {
    let (_, ca) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?;
    let at = i64::try_from(now.as_secs())
        .ok()
        .and_then(|t| x509_parser::time::ASN1Time::from_timestamp(t).ok())
        .context("time")?;
    if !ca.validity().is_valid_at(at) {
        anyhow::bail!("CA certificate outside its validity");
    }
    match ca.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => anyhow::bail!("not a CA certificate (basicConstraints cA)"),
    }
    match ca.key_usage() {
        Ok(None) => Ok(()),
        Ok(Some(ku)) if ku.value.key_cert_sign() => Ok(()),
        _ => anyhow::bail!("CA certificate without keyCertSign"),
    }
}

/// The first certificate in a PEM file, as DER.
pub fn read_cert_pem(text: &str) -> Result<Vec<u8>> {
    Ok(certs_pem(text.as_bytes())?
        .into_iter()
        .next()
        .context("no certificate in PEM")?
        .to_vec())
}

/// Every certificate in PEM `bytes`, in order (rustls-pki-types' PEM
/// reader, the one rustls itself uses).
pub fn certs_pem(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .context("bad PEM certificate")
}

/// The first private key in PEM `bytes` (PKCS#8, SEC1 or PKCS#1).
pub fn private_key_pem(bytes: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(bytes).context("no private key in PEM")
}

/// The DER of the first `PUBLIC KEY` (SPKI) or `PRIVATE KEY` (PKCS#8)
/// block in `text`.
pub fn pem_der(text: &str, tag: &str) -> Result<Vec<u8>> {
    let der = match tag {
        "PUBLIC KEY" => SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes())?.to_vec(),
        "PRIVATE KEY" => PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())?
            .secret_pkcs8_der()
            .to_vec(),
        other => anyhow::bail!("no PEM reader for {other:?} blocks"),
    };
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::KeyPair;
    use rustls::pki_types::UnixTime;

    const HOUR: Duration = Duration::from_secs(3600);

    fn key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn leaf(ca: &[u8], ca_key: &KeyPair, usage: Usage) -> Vec<u8> {
        issue(ca, ca_key, "market m1", &[], usage, HOUR, &key()).unwrap()
    }

    /// A self-signed CA certificate from `params`.
    fn ca_from(params: CertificateParams) -> (Vec<u8>, KeyPair) {
        let k = key();
        (params.self_signed(&k).unwrap().der().to_vec(), k)
    }

    fn at(secs_from_now: i64) -> UnixTime {
        let now = UnixTime::now().as_secs() as i64;
        UnixTime::since_unix_epoch(Duration::from_secs((now + secs_from_now) as u64))
    }

    fn check(leaf: &[u8], ca: &[u8]) -> Result<()> {
        verify_issued(leaf, ca, webpki::KeyUsage::server_auth(), at(0))
    }

    /// The refusal, with its causes.
    fn refusal(r: Result<()>) -> String {
        format!("{:#}", r.expect_err("refused"))
    }

    #[test]
    fn a_leaf_chains_to_its_ca_for_its_usage_while_both_are_valid() {
        let (ca, ca_key) = ca_from(ca_params("market CA"));
        let server = leaf(&ca, &ca_key, Usage::TlsServer);
        check(&server, &ca).unwrap();
        // No extended key usage at all: any usage.
        check(&leaf(&ca, &ca_key, Usage::Signing), &ca).unwrap();
        // Another usage named, not this one.
        let client = refusal(check(&leaf(&ca, &ca_key, Usage::TlsClient), &ca));
        assert!(client.contains("RequiredEkuNotFound"), "{client}");
        // Another CA, same name.
        let (other, _) = ca_from(ca_params("market CA"));
        let forged = refusal(check(&server, &other));
        assert!(forged.contains("InvalidSignatureForPublicKey"), "{forged}");
        // The leaf past its notAfter.
        let later = verify_issued(&server, &ca, webpki::KeyUsage::server_auth(), at(7200));
        assert!(refusal(later).contains("CertExpired"));
    }

    #[test]
    fn a_ca_certificate_as_the_leaf_is_refused() {
        let (ca, ca_key) = ca_from(ca_params("market CA"));
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(&ca[..]), &ca_key).unwrap();
        let sub = ca_params("sub CA").signed_by(&key(), &issuer).unwrap();
        assert!(refusal(check(sub.der(), &ca)).contains("CaUsedAsEndEntity"));
    }

    #[test]
    fn the_ca_must_be_a_valid_ca() {
        // A leaf certificate as the "CA" (no basicConstraints cA).
        let (ca, ca_key) = ca_from(ca_params("market CA"));
        let leaf_key = key();
        let not_ca = issue(
            &ca,
            &ca_key,
            "market m1",
            &[],
            Usage::TlsServer,
            HOUR,
            &leaf_key,
        )
        .unwrap();
        let below = leaf(&not_ca, &leaf_key, Usage::TlsServer);
        assert!(refusal(check(&below, &not_ca)).contains("not a CA"));
        // A CA without keyCertSign.
        let mut p = ca_params("market CA");
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (no_sign, k) = ca_from(p);
        let no_sign = refusal(check(&leaf(&no_sign, &k, Usage::TlsServer), &no_sign));
        assert!(no_sign.contains("keyCertSign"), "{no_sign}");
        // An expired CA: webpki alone would accept the leaf.
        let mut p = ca_params("market CA");
        let now = SystemTime::now();
        p.not_before = (now - 3 * HOUR).into();
        p.not_after = (now - HOUR).into();
        let (old, k) = ca_from(p);
        let l = leaf(&old, &k, Usage::TlsServer);
        chains_to(&l, &old, webpki::KeyUsage::server_auth(), at(0)).unwrap();
        assert!(refusal(check(&l, &old)).contains("outside its validity"));
    }
}
