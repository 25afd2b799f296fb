//! Cancellation authorisations: a market signs, with its ECDSA P-256 key,
//! the canonical message naming the decision, the market and the user.
//! The broker verifies it before calling `Ledger::cancel`.
//!
//! ```text
//! market ──sign(cancel_message(decision, market, user))──► broker ──verify_cancel──► ledger.cancel
//! ```
//!
//! Why market-signed and not the user's second password: the market is the
//! party that agreed to undo the sale; the user alone could otherwise keep
//! the goods and take the money back.

use super::chain::put_str;
use super::{WalletError, WalletResult};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};

pub const LABEL: &[u8] = b"keybroker cancel v1";

/// The bytes a market signs to cancel `decision_id` of `user`.
pub fn cancel_message(decision_id: &str, market: &str, user: &str) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(LABEL.len() + 12 + decision_id.len() + market.len() + user.len());
    put_str(&mut out, LABEL);
    put_str(&mut out, decision_id.as_bytes());
    put_str(&mut out, market.as_bytes());
    put_str(&mut out, user.as_bytes());
    out
}

/// Checks a DER ECDSA P-256/SHA-256 signature by the market's key (SPKI DER
/// or uncompressed point).
pub fn verify_cancel(
    market_public: &[u8],
    decision_id: &str,
    market: &str,
    user: &str,
    signature: &[u8],
) -> WalletResult<()> {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, market_public)
        .verify(&cancel_message(decision_id, market, user), signature)
        .map_err(|_| WalletError::BadAuthorisation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    #[test]
    fn market_signature_binds_decision_market_and_user() {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();
        let pk = k.public_key().as_ref().to_vec();
        let sig = k.sign(&rng, &cancel_message("d1", "m1", "alice")).unwrap();
        assert!(verify_cancel(&pk, "d1", "m1", "alice", sig.as_ref()).is_ok());
        for (d, m, u) in [
            ("d2", "m1", "alice"),
            ("d1", "m2", "alice"),
            ("d1", "m1", "bob"),
        ] {
            assert_eq!(
                verify_cancel(&pk, d, m, u, sig.as_ref()),
                Err(WalletError::BadAuthorisation)
            );
        }
        assert!(verify_cancel(&pk, "d1", "m1", "alice", b"junk").is_err());
        assert!(verify_cancel(b"junk", "d1", "m1", "alice", sig.as_ref()).is_err());
        assert_ne!(
            cancel_message("ab", "c", "u"),
            cancel_message("a", "bc", "u")
        );
    }
}
