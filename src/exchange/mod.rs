//! The cryptography of one brokered exchange, shared by broker, market and
//! terminal so all three compute the same bytes.
//!
//! ```text
//! preimage = "keybroker exchange v2" ‖ mode ‖ market ‖ user ‖ SHA-256(user cert)
//!            ‖ request id ‖ group ‖ requester ephemeral ‖ time ‖ nonce ‖ market-channel binding
//! T = SHA-256(preimage)            signed by the user's home-card key (ECDSA P-256)
//! Z = ECDH(requester ephemeral, market ephemeral), both in `group`
//! X = HMAC-SHA256(key = Z, "keybroker X v1" ‖ T ‖ market ephemeral)
//! wrapped X = AES-KWP(key = X'wrap, X)  (RFC 5649)
//! ```
//!
//! SoftHSM can compute X with Z inside it (`ECDH1_DERIVE` to a generic
//! secret, then `SHA256_HMAC`), so `kx = "hsm"` and `kx = "software"` give the
//! same X.
//!
//! The requester picks the group: X25519 wherever the ECDH runs in software
//! (it costs 28 µs against P-256's 48 here), P-256 where it runs in SoftHSM,
//! which has no X25519 (docs/DECISIONS.md, "The exchange's group"). The
//! market answers in the requester's group.

use crate::proto::wire::Put;
use aws_lc_rs::agreement::{self, Algorithm, ECDH_P256, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::key_wrap::{AES_256, KeyEncryptionKey, KeyWrapPadded};
use zeroize::Zeroizing;

pub mod flow;
pub mod keyops;

pub const PREIMAGE_LABEL: &[u8] = b"keybroker exchange v2";
pub const X_LABEL: &[u8] = b"keybroker X v1";
/// TLS exporter label binding exchanges to one market-channel connection.
pub const BINDING_LABEL: &[u8] = b"EXPORTER-keybroker-market-binding";
pub use crate::proto::point::{Group, MAX_POINT_LEN, Mode, Point, WRAPPED_LEN};

/// aws-lc-rs's algorithm for `group`.
fn algorithm(group: Group) -> &'static Algorithm {
    match group {
        Group::P256 => &ECDH_P256,
        Group::X25519 => &X25519,
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
    pub ephemeral: Point,
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
        self.ephemeral.put(&mut v);
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

/// The parts of the HMAC input that turns Z into X, one list for the HSM's
/// input and the software HMAC so both give the same X.
fn x_parts<'a>(t: &'a [u8; 32], market_ephemeral: &'a Point) -> [&'a [u8]; 3] {
    [X_LABEL, t, market_ephemeral.as_bytes()]
}

/// The HMAC input that turns Z into X, for the HSM's `SHA256_HMAC`.
pub fn x_input(t: &[u8; 32], market_ephemeral: &Point) -> Vec<u8> {
    x_parts(t, market_ephemeral).concat()
}

/// X from a shared secret Z computed in software.
pub fn derive_x(z: &[u8], t: &[u8; 32], market_ephemeral: &Point) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(crate::crypto::hmac_sha256(z, &x_parts(t, market_ephemeral)))
}

/// An ephemeral key in process (aws-lc-rs).
pub struct Ephemeral {
    key: PrivateKey,
    pub public: Point,
}

impl Ephemeral {
    pub fn generate(group: Group) -> Self {
        let key = PrivateKey::generate(algorithm(group)).expect("ephemeral key generation");
        Self::with_key(group, key)
    }

    /// A fixed key, for test vectors only: a real exchange's ephemeral key
    /// must be fresh. `private` is the group's private key encoding (P-256:
    /// the 32-byte big-endian scalar; X25519: the 32 bytes of RFC 7748).
    /// `None` if it is not a valid key of the group.
    pub fn from_private_bytes_for_vectors(group: Group, private: &[u8]) -> Option<Self> {
        let key = PrivateKey::from_private_key(algorithm(group), private).ok()?;
        Some(Self::with_key(group, key))
    }

    fn with_key(group: Group, key: PrivateKey) -> Self {
        let public = Point::new(
            group,
            key.compute_public_key().expect("public key").as_ref(),
        )
        .expect("a public key of the group's length");
        Self { key, public }
    }

    /// Runs `f` on Z, the ECDH secret with the peer's key; `None` if the
    /// peer's key is not a valid one of this key's group.
    fn agree<R>(&self, peer: &Point, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        if peer.group() != self.public.group() {
            return None;
        }
        agreement::agree(
            &self.key,
            UnparsedPublicKey::new(algorithm(self.public.group()), peer.as_bytes()),
            (),
            |z| Ok(f(z)),
        )
        .ok()
    }

    /// X with the peer's ephemeral key; `None` if the peer's key is not a
    /// valid one of this key's group.
    pub fn x(
        &self,
        peer: &Point,
        t: &[u8; 32],
        market_ephemeral: &Point,
    ) -> Option<Zeroizing<[u8; 32]>> {
        self.agree(peer, |z| derive_x(z, t, market_ephemeral))
    }

    /// X from Z and the whole HMAC input at once ([`x_input`]), as the HSM's
    /// `SHA256_HMAC` takes it; `None` for a peer key of another group.
    pub fn x_from_input(&self, peer: &Point, input: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        self.agree(peer, |z| {
            Zeroizing::new(crate::crypto::hmac_sha256(z, &[input]))
        })
    }

    /// Z itself, for test vectors only: the exchange never needs it
    /// outside [`Ephemeral::x`].
    pub fn shared_secret_for_vectors(&self, peer: &Point) -> Option<Zeroizing<Vec<u8>>> {
        self.agree(peer, |z| Zeroizing::new(z.to_vec()))
    }
}

/// Wraps X under X'wrap, the connection's wrap key (RFC 5649).
pub fn wrap(wrap_key: &[u8; 32], x: &[u8; 32]) -> [u8; WRAPPED_LEN] {
    let kek = KeyEncryptionKey::new(&AES_256, wrap_key).expect("AES-256 key");
    let mut out = [0u8; WRAPPED_LEN + 8];
    let n = kek
        .wrap_with_padding(x, &mut out)
        .expect("wrapping 32 bytes")
        .len();
    debug_assert_eq!(n, WRAPPED_LEN);
    out[..WRAPPED_LEN].try_into().expect("40 bytes")
}

/// Unwraps X; `None` if the integrity check fails (another wrap key).
pub fn unwrap(wrap_key: &[u8; 32], wrapped: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let kek = KeyEncryptionKey::new(&AES_256, wrap_key).ok()?;
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
    use crate::proto::wire::{Reader, WireError};

    #[test]
    fn both_sides_agree_on_x_and_wrap_round_trips() {
        for group in [Group::P256, Group::X25519] {
            let a = Ephemeral::generate(group);
            let m = Ephemeral::generate(group);
            let t = [5u8; 32];
            let xa = a.x(&m.public, &t, &m.public).unwrap();
            let xm = m.x(&a.public, &t, &m.public).unwrap();
            assert_eq!(*xa, *xm);
            let xp = [9u8; 32];
            let w = wrap(&xp, &xa);
            assert_eq!(*unwrap(&xp, &w).unwrap(), *xa);
            assert!(unwrap(&[8u8; 32], &w).is_none());
        }
        let p = Ephemeral::generate(Group::P256);
        let x = Ephemeral::generate(Group::X25519);
        let t = [5u8; 32];
        let off_curve = Point::new(Group::P256, &[4u8; 65]).unwrap();
        assert!(p.x(&off_curve, &t, &off_curve).is_none());
        // X25519's all-zero output (a small-order peer key) is refused.
        let small = Point::new(Group::X25519, &[0u8; 32]).unwrap();
        assert!(x.x(&small, &t, &small).is_none());
        // Keys of different groups never agree.
        assert!(p.x(&x.public, &t, &x.public).is_none());
        assert!(x.x(&p.public, &t, &p.public).is_none());
    }

    #[test]
    fn points_round_trip_and_their_group_fixes_the_length() {
        for group in [Group::P256, Group::X25519] {
            let e = Ephemeral::generate(group);
            let mut out = Vec::new();
            e.public.put(&mut out);
            assert_eq!(out.len(), 1 + group.point_len());
            let mut r = Reader::new(&out);
            assert_eq!(Point::read(&mut r, "p").unwrap(), e.public);
            r.finish().unwrap();
        }
        assert!(Point::new(Group::X25519, &[1u8; 65]).is_none());
        assert!(Point::new(Group::P256, &[1u8; 32]).is_none());
        let mut r = Reader::new(&[7, 0, 0]);
        assert_eq!(Point::read(&mut r, "p"), Err(WireError::Invalid("p")));
        let mut r = Reader::new(&[1, 0, 0]);
        assert_eq!(Point::read(&mut r, "p"), Err(WireError::Truncated("p")));
    }

    #[test]
    fn any_field_changes_t() {
        let base = Transcript {
            mode: Mode::Full,
            market: "m".into(),
            user: "u".into(),
            cert_fingerprint: [1; 32],
            request_id: 7,
            ephemeral: Point::new(Group::X25519, &[4; 32]).unwrap(),
            time_ms: 1,
            nonce: [2; 16],
            binding: [3; 32],
        };
        let mut other = base.clone();
        other.user = "v".into();
        assert_ne!(base.digest(), other.digest());
        let mut other = base.clone();
        other.ephemeral = Point::new(Group::P256, &[4; 65]).unwrap();
        assert_ne!(base.digest(), other.digest());
        let mut other = base.clone();
        other.binding = [0; 32];
        assert_ne!(base.digest(), other.digest());
    }
}
