//! An HSM key as an rcgen signer, so certificate authorities keep their
//! keys in the token while rcgen builds the certificates.

use super::ops;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use rcgen::{PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};

/// A P-256 private key in the HSM, used through the caller's session.
pub struct HsmSigner<'a> {
    pub session: &'a Session,
    pub key: ObjectHandle,
    /// Uncompressed public point, 65 bytes.
    pub point: Vec<u8>,
}

impl PublicKeyData for HsmSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for HsmSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        ops::sign_p256(self.session, self.key, msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// A P-256 public key given as its uncompressed point.
pub struct P256Public(pub Vec<u8>);

impl PublicKeyData for P256Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}
