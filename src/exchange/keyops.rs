//! The key holder an exchange's [`KeyJob`]s run on, behind one trait.
//!
//! Two holders implement [`KeyOps`]:
//!
//! - the home card, SoftHSM or any PKCS#11 token through cryptoki: the
//!   broker's HSM workers (`broker::exchange`), where the user's key is a
//!   released session object and an ephemeral never leaves the token;
//! - [`SoftCard`], in process and deterministic: ECDSA P-256 with RFC 6979
//!   nonces and ephemerals drawn from a seed, so that the simulation
//!   (tests/sim.rs) signs and derives for real and still repeats byte for
//!   byte. Its keys are in memory: it is never a home card.
//!
//! A job's steps are put together once, in [`KeyJob::run`], for every
//! holder: kx=hsm's keygen-and-sign is one job (one trip to the pool), and
//! an ephemeral whose signature failed is destroyed before the job ends.

use super::flow::KeyJob;
use super::{Ephemeral, Group, Point};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// The operations of a key holder that an exchange needs.
pub trait KeyOps {
    /// A released user's signing key.
    type Key: Copy;
    /// An ephemeral private key the holder keeps until it derives or is
    /// destroyed.
    type Private;
    type Error;
    /// ECDSA P-256 over a 32-byte digest, DER-encoded.
    fn sign_digest(&self, key: Self::Key, digest: &[u8; 32]) -> Result<Vec<u8>, Self::Error>;
    /// A fresh P-256 ephemeral for ECDH: its public point, and the private
    /// key's handle.
    fn generate_ephemeral(&self) -> Result<(Point, Self::Private), Self::Error>;
    /// X = HMAC-SHA256(ECDH(private, peer), input), consuming `private`
    /// whatever the outcome.
    fn derive_x(
        &self,
        private: Self::Private,
        peer: &Point,
        input: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, Self::Error>;
    /// Destroys an ephemeral that will not be used.
    fn destroy(&self, private: Self::Private);
}

/// What a [`KeyJob`] gave, for `Flow::handle_key`.
#[derive(Debug)]
pub enum KeyDone<P> {
    Signed(Vec<u8>),
    /// kx=hsm: the ephemeral's point and handle, T's digest with that
    /// point, and the signature over it.
    KeygenSigned {
        point: Point,
        private: P,
        digest: [u8; 32],
        signature: Vec<u8>,
    },
    Derived(Zeroizing<[u8; 32]>),
}

impl<P> KeyJob<P> {
    /// The job's name in the HSM metrics.
    pub fn op(&self) -> &'static str {
        match self {
            KeyJob::Sign { .. } => "sign",
            KeyJob::KeygenSign { .. } => "keygen_sign",
            KeyJob::Derive { .. } => "derive",
        }
    }

    /// Runs the job on `ops`, signing with `key`.
    pub fn run<O: KeyOps<Private = P>>(self, ops: &O, key: O::Key) -> Result<KeyDone<P>, O::Error> {
        match self {
            KeyJob::Sign { digest } => ops.sign_digest(key, &digest).map(KeyDone::Signed),
            KeyJob::KeygenSign { mut transcript } => {
                let (point, private) = ops.generate_ephemeral()?;
                transcript.ephemeral = point;
                let digest = transcript.digest();
                match ops.sign_digest(key, &digest) {
                    Ok(signature) => Ok(KeyDone::KeygenSigned {
                        point,
                        private,
                        digest,
                        signature,
                    }),
                    Err(e) => {
                        ops.destroy(private);
                        Err(e)
                    }
                }
            }
            KeyJob::Derive {
                private,
                peer,
                input,
            } => ops.derive_x(private, &peer, &input).map(KeyDone::Derived),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SoftCardError {
    #[error("no user key {0}")]
    UnknownKey(usize),
    #[error("no ephemeral {0} (derived or destroyed already)")]
    UnknownPrivate(u64),
    #[error("the peer's key is not a P-256 point")]
    BadPoint,
}

/// A deterministic software key holder: user `i`'s key and every
/// ephemeral come from the seed, and RFC 6979 makes each signature a
/// function of the key and the digest.
pub struct SoftCard {
    seed: Zeroizing<[u8; 32]>,
    users: Vec<SigningKey>,
    next: Cell<u64>,
    live: RefCell<BTreeMap<u64, Ephemeral>>,
}

impl SoftCard {
    pub fn new(seed: [u8; 32], users: usize) -> Self {
        let seed = Zeroizing::new(seed);
        let users = (0..users)
            .map(|i| {
                (0u32..)
                    .find_map(|n| {
                        let d = Self::draw(&seed, b"user", i as u64, n);
                        SigningKey::from_slice(&*d).ok()
                    })
                    .expect("a valid scalar within a few draws")
            })
            .collect();
        Self {
            seed,
            users,
            next: Cell::new(0),
            live: RefCell::new(BTreeMap::new()),
        }
    }

    fn draw(seed: &[u8; 32], what: &[u8], i: u64, n: u32) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(crate::crypto::hmac_sha256(
            seed,
            &[what, &i.to_be_bytes(), &n.to_be_bytes()],
        ))
    }

    /// User `i`'s public key, uncompressed SEC1, as a certificate carries it.
    pub fn public(&self, user: usize) -> Vec<u8> {
        self.users[user]
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    /// Ephemerals made and neither derived nor destroyed.
    pub fn live(&self) -> usize {
        self.live.borrow().len()
    }
}

impl KeyOps for SoftCard {
    type Key = usize;
    type Private = u64;
    type Error = SoftCardError;

    fn sign_digest(&self, key: usize, digest: &[u8; 32]) -> Result<Vec<u8>, SoftCardError> {
        let k = self.users.get(key).ok_or(SoftCardError::UnknownKey(key))?;
        let sig: Signature = k
            .sign_prehash(digest)
            .expect("a 32-byte digest signs with P-256");
        Ok(sig.to_der().as_bytes().to_vec())
    }

    fn generate_ephemeral(&self) -> Result<(Point, u64), SoftCardError> {
        let handle = self.next.get();
        self.next.set(handle + 1);
        let e = (0u32..)
            .find_map(|n| {
                let d = Self::draw(&self.seed, b"ephemeral", handle, n);
                Ephemeral::from_private_bytes_for_vectors(Group::P256, &*d)
            })
            .expect("a valid scalar within a few draws");
        let point = e.public;
        self.live.borrow_mut().insert(handle, e);
        Ok((point, handle))
    }

    fn derive_x(
        &self,
        private: u64,
        peer: &Point,
        input: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, SoftCardError> {
        let e = self
            .live
            .borrow_mut()
            .remove(&private)
            .ok_or(SoftCardError::UnknownPrivate(private))?;
        e.x_from_input(peer, input).ok_or(SoftCardError::BadPoint)
    }

    fn destroy(&self, private: u64) {
        self.live.borrow_mut().remove(&private);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::{Mode, Transcript, verify_signature, x_input};

    fn transcript() -> Transcript {
        Transcript {
            mode: Mode::Full,
            market: "m".into(),
            user: "alice".into(),
            cert_fingerprint: [1; 32],
            request_id: 7,
            ephemeral: Point::UNSET,
            time_ms: 1,
            nonce: [2; 16],
            binding: [3; 32],
        }
    }

    #[test]
    fn the_same_seed_signs_the_same_bytes_and_the_signature_verifies() {
        let (a, b) = (SoftCard::new([9; 32], 2), SoftCard::new([9; 32], 2));
        let t = transcript();
        let job = || KeyJob::<u64>::Sign { digest: t.digest() };
        let (KeyDone::Signed(x), KeyDone::Signed(y)) =
            (job().run(&a, 1).unwrap(), job().run(&b, 1).unwrap())
        else {
            panic!()
        };
        assert_eq!(x, y, "RFC 6979: one signature per key and digest");
        assert!(verify_signature(&a.public(1), &t.preimage(), &x));
        assert!(!verify_signature(&a.public(0), &t.preimage(), &x));
        assert_ne!(SoftCard::new([8; 32], 2).public(1), a.public(1));
    }

    #[test]
    fn keygen_sign_then_derive_gives_the_markets_x_and_consumes_the_ephemeral() {
        let card = SoftCard::new([4; 32], 1);
        let KeyDone::KeygenSigned {
            point,
            private,
            digest,
            signature,
        } = KeyJob::KeygenSign {
            transcript: transcript(),
        }
        .run(&card, 0)
        .unwrap()
        else {
            panic!()
        };
        let mut t = transcript();
        t.ephemeral = point;
        assert_eq!(t.digest(), digest, "T carries the card's ephemeral");
        assert!(verify_signature(&card.public(0), &t.preimage(), &signature));
        assert_eq!(card.live(), 1);
        let market = Ephemeral::generate(Group::P256);
        let want = market.x(&point, &digest, &market.public).unwrap();
        let KeyDone::Derived(x) = KeyJob::Derive {
            private,
            peer: market.public,
            input: x_input(&digest, &market.public),
        }
        .run(&card, 0)
        .unwrap() else {
            panic!()
        };
        assert_eq!(*x, *want);
        assert_eq!(card.live(), 0, "derive consumes the ephemeral");
        let again = KeyJob::Derive {
            private,
            peer: market.public,
            input: vec![],
        };
        assert_eq!(
            again.run(&card, 0).unwrap_err(),
            SoftCardError::UnknownPrivate(private)
        );
    }

    #[test]
    fn a_failed_signature_destroys_the_new_ephemeral() {
        let card = SoftCard::new([4; 32], 1);
        let r = KeyJob::KeygenSign {
            transcript: transcript(),
        }
        .run(&card, 5);
        assert_eq!(r.unwrap_err(), SoftCardError::UnknownKey(5));
        assert_eq!(card.live(), 0);
    }
}
