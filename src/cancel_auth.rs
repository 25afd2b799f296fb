//! Cancellation authorisations (claim 5): a market's signed consent to undo
//! one purchase decision of one user, once, for a short while.
//!
//! ```text
//! market: decision seen, not delivered ─► CancelAuth{decision, market, user, nonce, expiry}
//!         ─► ECDSA P-256 by its cancel-signing key (a certificate with EKU documentSigning)
//! terminal ─► broker: Cancel{decision_id, authorisation} ─► cert → that market's CA,
//!         EKU, signature, user, expiry ─► ledger refunds once
//! ```
//!
//! Why the market's signature, not the user's second password: the market
//! knows whether the goods went out; the user alone could otherwise keep
//! them and take the money back. Why a dedicated key with its own EKU: the
//! market's TLS key signs handshakes over bytes a peer influences, and a
//! TLS certificate must not be able to authorise refunds (nor this one to
//! serve TLS). Why a nonce and an expiry: every authorisation the market
//! issues is a distinct, short-lived statement it can record, never a
//! standing one; the broker refunds a decision once whatever it is shown.

use crate::proto::access::{MAX_BLOB, MAX_SIGNATURE, MAX_USER};
use crate::proto::wire::{Put, Reader, WireError};

pub const LABEL: &[u8] = b"keybroker cancel v2";
/// The longest an authorisation may be valid for; the broker refuses one
/// whose expiry lies further ahead (a market clock gone wrong, or a
/// standing authorisation).
pub const MAX_LIFETIME_MS: u64 = 15 * 60 * 1000;
/// Largest encoded authorisation: its body, signature and certificate.
pub const MAX_ENCODED: usize = crate::proto::access::MAX_AUTHORISATION;
/// id-kp-documentSigning (RFC 9336), DER content octets of the OID
/// 1.3.6.1.5.5.7.3.36: the EKU a cancel-signing certificate carries.
pub const EKU_DOCUMENT_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x24];
/// The same OID as rcgen's arcs.
pub const EKU_DOCUMENT_SIGNING_ARCS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 36];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelAuth {
    pub decision_id: String,
    pub market: String,
    pub user: String,
    /// Fresh random bytes per authorisation.
    pub nonce: [u8; 16],
    /// Unix time, ms, after which the broker refuses it.
    pub expiry_ms: u64,
}

impl CancelAuth {
    /// The signed bytes: `LABEL ‖ decision_id:str ‖ market:str ‖ user:str ‖
    /// nonce:[16] ‖ expiry_ms:u64` (docs/PROTOCOL.md §1.8).
    pub fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.decision_id.len() + self.user.len());
        v.extend_from_slice(LABEL);
        v.put_bytes(self.decision_id.as_bytes());
        v.put_bytes(self.market.as_bytes());
        v.put_bytes(self.user.as_bytes());
        v.extend_from_slice(&self.nonce);
        v.put_u64(self.expiry_ms);
        v
    }

    fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        if r.take(LABEL.len(), "label")? != LABEL {
            return Err(WireError::Invalid("label"));
        }
        let s = |r: &mut Reader<'_>, what| r.str(MAX_USER, what).map(str::to_owned);
        let auth = Self {
            decision_id: s(&mut r, "decision_id")?,
            market: s(&mut r, "market")?,
            user: s(&mut r, "user")?,
            nonce: r.array("nonce")?,
            expiry_ms: r.u64("expiry_ms")?,
        };
        r.finish()?;
        Ok(auth)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCancel {
    pub auth: CancelAuth,
    /// ECDSA P-256 with SHA-256 (DER) over [`CancelAuth::body`].
    pub signature: Vec<u8>,
    /// DER of the market's cancel-signing certificate.
    pub cert: Vec<u8>,
}

impl SignedCancel {
    /// `body:bytes ‖ signature:bytes ‖ cert:bytes`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(256 + self.cert.len());
        v.put_bytes(&self.auth.body());
        v.put_bytes(&self.signature);
        v.put_bytes(&self.cert);
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let auth = CancelAuth::parse(r.bytes(512, "body")?)?;
        let signature = r.bytes(MAX_SIGNATURE, "signature")?.to_vec();
        let cert = r.bytes(MAX_BLOB, "cert")?.to_vec();
        r.finish()?;
        Ok(Self {
            auth,
            signature,
            cert,
        })
    }

    /// Whether the signature verifies under `public` (SPKI DER or an
    /// uncompressed point).
    pub fn verify(&self, public: &[u8]) -> bool {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public)
            .verify(&self.auth.body(), &self.signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn auth() -> CancelAuth {
        CancelAuth {
            decision_id: "d1".into(),
            market: "m1".into(),
            user: "alice".into(),
            nonce: [7; 16],
            expiry_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn the_signature_binds_every_field() {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();
        let pk = k.public_key().as_ref().to_vec();
        let signed = SignedCancel {
            auth: auth(),
            signature: k.sign(&rng, &auth().body()).unwrap().as_ref().to_vec(),
            cert: vec![1, 2, 3],
        };
        assert!(signed.verify(&pk));
        let wire = signed.encode();
        assert_eq!(SignedCancel::decode(&wire).unwrap(), signed);
        let changes: [fn(&mut CancelAuth); 5] = [
            |a| a.decision_id = "d2".into(),
            |a| a.market = "m2".into(),
            |a| a.user = "bob".into(),
            |a| a.nonce[0] ^= 1,
            |a| a.expiry_ms += 1,
        ];
        for change in changes {
            let mut other = signed.clone();
            change(&mut other.auth);
            assert!(!other.verify(&pk), "{:?}", other.auth);
        }
        for cut in [0, 1, 10, wire.len() - 1] {
            assert!(SignedCancel::decode(&wire[..cut]).is_err());
        }
        // Length prefixes keep field boundaries apart.
        let mut a = auth();
        a.decision_id = "ab".into();
        a.market = "c".into();
        let mut b = auth();
        b.decision_id = "a".into();
        b.market = "bc".into();
        assert_ne!(a.body(), b.body());
    }
}
