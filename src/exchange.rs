//! The cryptography of one brokered exchange, shared by broker, market and
//! terminal so all three compute the same bytes.
//!
//! ```text
//! preimage = "keybroker exchange v1" ‖ mode ‖ market ‖ user ‖ SHA-256(user cert)
//!            ‖ request id ‖ requester ephemeral ‖ time ‖ nonce ‖ market-channel binding
//! T = SHA-256(preimage)            signed by the user's home-card key (ECDSA P-256)
//! Z = ECDH(requester ephemeral, market ephemeral)
//! X = HMAC-SHA256(key = Z, "keybroker X v1" ‖ T ‖ market ephemeral)
//! wrapped X = AES-KWP(key = X', X)  (RFC 5649)
//! ```
//!
//! SoftHSM can compute X with Z inside it (`ECDH1_DERIVE` to a generic
//! secret, then `SHA256_HMAC`), so `kx = "hsm"` and `kx = "software"` give the
//! same X and the market cannot tell them apart.

use crate::proto::wire::Put;
use aws_lc_rs::agreement::{self, ECDH_P256, PrivateKey, UnparsedPublicKey};
use aws_lc_rs::key_wrap::{AES_256, KeyEncryptionKey, KeyWrapPadded};
use zeroize::Zeroizing;

pub const PREIMAGE_LABEL: &[u8] = b"keybroker exchange v1";
pub const X_LABEL: &[u8] = b"keybroker X v1";
/// TLS exporter label binding exchanges to one market-channel connection.
pub const BINDING_LABEL: &[u8] = b"EXPORTER-keybroker-market-binding";
/// Length of an uncompressed P-256 point.
pub const POINT_LEN: usize = 65;
/// Length of X wrapped with AES-KWP (32 + 8).
pub const WRAPPED_LEN: usize = 40;

/// Who does the ECDH with the market.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// The broker (full proxy): it learns X and wraps it for the terminal.
    Full = 0,
    /// The terminal (partial proxy, claim 8): the broker only signs.
    Partial = 1,
}

impl Mode {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Full),
            1 => Some(Self::Partial),
            _ => None,
        }
    }
}

/// The fields the user's signature covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    pub mode: Mode,
    pub market: String,
    pub user: String,
    pub cert_fingerprint: [u8; 32],
    pub request_id: u64,
    pub ephemeral: [u8; POINT_LEN],
    pub time_ms: u64,
    pub nonce: [u8; 16],
    pub binding: [u8; 32],
}

impl Transcript {
    pub fn preimage(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(PREIMAGE_LABEL);
        v.put_u8(self.mode as u8);
        v.put_bytes(self.market.as_bytes());
        v.put_bytes(self.user.as_bytes());
        v.extend_from_slice(&self.cert_fingerprint);
        v.put_u64(self.request_id);
        v.extend_from_slice(&self.ephemeral);
        v.put_u64(self.time_ms);
        v.extend_from_slice(&self.nonce);
        v.extend_from_slice(&self.binding);
        v
    }

    /// T, the digest the home-card key signs.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.preimage())
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("32 bytes")
}

/// The HMAC input that turns Z into X.
pub fn x_input(t: &[u8; 32], market_ephemeral: &[u8; POINT_LEN]) -> Vec<u8> {
    [X_LABEL, t, market_ephemeral].concat()
}

/// X from a shared secret Z computed in software.
pub fn derive_x(z: &[u8], t: &[u8; 32], market_ephemeral: &[u8; POINT_LEN]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(crate::crypto::hmac_sha256(
        z,
        &[X_LABEL, t, market_ephemeral],
    ))
}

/// An ephemeral P-256 key in process (aws-lc-rs).
pub struct Ephemeral {
    key: PrivateKey,
    pub public: [u8; POINT_LEN],
}

impl Ephemeral {
    pub fn generate() -> Self {
        let key = PrivateKey::generate(&ECDH_P256).expect("P-256 key generation");
        let public = key
            .compute_public_key()
            .expect("public key")
            .as_ref()
            .try_into()
            .expect("uncompressed P-256 point");
        Self { key, public }
    }

    /// X with the peer's ephemeral key; `None` if the point is invalid.
    pub fn x(
        &self,
        peer: &[u8; POINT_LEN],
        t: &[u8; 32],
        market_ephemeral: &[u8; POINT_LEN],
    ) -> Option<Zeroizing<[u8; 32]>> {
        agreement::agree(
            &self.key,
            UnparsedPublicKey::new(&ECDH_P256, peer),
            (),
            |z| Ok(derive_x(z, t, market_ephemeral)),
        )
        .ok()
    }
}

/// Wraps X under X' (RFC 5649).
pub fn wrap(xprime: &[u8; 32], x: &[u8; 32]) -> [u8; WRAPPED_LEN] {
    let kek = KeyEncryptionKey::new(&AES_256, xprime).expect("AES-256 key");
    let mut out = [0u8; WRAPPED_LEN + 8];
    let n = kek
        .wrap_with_padding(x, &mut out)
        .expect("wrapping 32 bytes")
        .len();
    debug_assert_eq!(n, WRAPPED_LEN);
    out[..WRAPPED_LEN].try_into().expect("40 bytes")
}

/// Unwraps X; `None` if the integrity check fails (wrong X').
pub fn unwrap(xprime: &[u8; 32], wrapped: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let kek = KeyEncryptionKey::new(&AES_256, xprime).ok()?;
    let mut out = Zeroizing::new([0u8; WRAPPED_LEN]);
    let x = kek.unwrap_with_padding(wrapped, &mut out[..]).ok()?;
    Some(Zeroizing::new(x.try_into().ok()?))
}

/// Verifies an ECDSA P-256 signature (DER) by the key `point` over T.
pub fn verify_signature(point: &[u8], preimage: &[u8], signature: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        point,
    )
    .verify(preimage, signature)
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_on_x_and_wrap_round_trips() {
        let a = Ephemeral::generate();
        let m = Ephemeral::generate();
        let t = [5u8; 32];
        let xa = a.x(&m.public, &t, &m.public).unwrap();
        let xm = m.x(&a.public, &t, &m.public).unwrap();
        assert_eq!(*xa, *xm);
        let xp = [9u8; 32];
        let w = wrap(&xp, &xa);
        assert_eq!(*unwrap(&xp, &w).unwrap(), *xa);
        assert!(unwrap(&[8u8; 32], &w).is_none());
        assert!(a.x(&[4u8; 65], &t, &m.public).is_none());
    }

    #[test]
    fn any_field_changes_t() {
        let base = Transcript {
            mode: Mode::Full,
            market: "m".into(),
            user: "u".into(),
            cert_fingerprint: [1; 32],
            request_id: 7,
            ephemeral: [4; 65],
            time_ms: 1,
            nonce: [2; 16],
            binding: [3; 32],
        };
        let mut other = base.clone();
        other.user = "v".into();
        assert_ne!(base.digest(), other.digest());
        let mut other = base.clone();
        other.binding = [0; 32];
        assert_ne!(base.digest(), other.digest());
    }
}
