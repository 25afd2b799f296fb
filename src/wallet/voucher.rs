//! Single-use top-up vouchers, signed by a configured issuer key.
//!
//! ```text
//! issuer (PKCS#8 PEM, ECDSA P-256) ──issue──► body ‖ u16 sig_len ‖ DER signature
//! body = "keybroker voucher v1" ‖ id[16] ‖ u16 len ‖ user ‖ i64 amount ‖ currency[3] ‖ u64 expiry_ms
//! broker ──verify(issuer SPKI or point, bytes, now)──► Voucher ──► ledger top_up (id used once)
//! ```
//!
//! The signature proves the issuer sold the credit; the ledger's
//! `vouchers_used` table makes each id credit once. The encoding is
//! canonical: one byte string per voucher, no trailing bytes accepted.

use super::{Amount, Currency, WalletError, WalletResult, check_id};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

pub const LABEL: &[u8] = b"keybroker voucher v1";
/// Longest DER ECDSA P-256 signature (72 bytes) with room to spare.
const MAX_SIG: usize = 80;
const MAX_USER: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Voucher {
    pub id: [u8; 16],
    pub user: String,
    pub amount: Amount,
    pub expiry_ms: i64,
}

/// A voucher with its issuer's signature over [`Voucher::body`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub voucher: Voucher,
    pub signature: Vec<u8>,
}

impl Voucher {
    /// The signed bytes.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LABEL.len() + 16 + 2 + self.user.len() + 8 + 3 + 8);
        out.extend_from_slice(LABEL);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&(self.user.len() as u16).to_be_bytes());
        out.extend_from_slice(self.user.as_bytes());
        out.extend_from_slice(&self.amount.minor.to_be_bytes());
        out.extend_from_slice(&self.amount.currency.bytes());
        out.extend_from_slice(&self.expiry_ms.to_be_bytes());
        out
    }
}

impl Signed {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.voucher.body();
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses without checking the signature. Never panics on junk.
    pub fn decode(bytes: &[u8]) -> WalletResult<Self> {
        let mut r = Reader(bytes);
        if r.take(LABEL.len())? != LABEL {
            return Err(WalletError::BadVoucher("not a keybroker voucher v1"));
        }
        let id: [u8; 16] = r
            .take(16)?
            .try_into()
            .map_err(|_| WalletError::BadVoucher("id"))?;
        let ulen = r.u16()? as usize;
        if ulen > MAX_USER {
            return Err(WalletError::BadVoucher("user too long"));
        }
        let user = std::str::from_utf8(r.take(ulen)?)
            .map_err(|_| WalletError::BadVoucher("user not UTF-8"))?
            .to_owned();
        check_id("user", &user).map_err(|_| WalletError::BadVoucher("user id"))?;
        let minor = i64::from_be_bytes(r.array()?);
        let cur: [u8; 3] = r.array()?;
        let currency = std::str::from_utf8(&cur)
            .ok()
            .and_then(|c| Currency::new(c).ok())
            .ok_or(WalletError::BadVoucher("currency"))?;
        let expiry_ms = i64::from_be_bytes(r.array()?);
        let slen = r.u16()? as usize;
        if slen == 0 || slen > MAX_SIG {
            return Err(WalletError::BadVoucher("signature length"));
        }
        let signature = r.take(slen)?.to_vec();
        if !r.0.is_empty() {
            return Err(WalletError::BadVoucher("trailing bytes"));
        }
        Ok(Self {
            voucher: Voucher {
                id,
                user,
                amount: Amount { minor, currency },
                expiry_ms,
            },
            signature,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> WalletResult<&'a [u8]> {
        if self.0.len() < n {
            return Err(WalletError::BadVoucher("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> WalletResult<[u8; N]> {
        self.take(N)?
            .try_into()
            .map_err(|_| WalletError::BadVoucher("truncated"))
    }
    fn u16(&mut self) -> WalletResult<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
}

/// A new issuer key: (PKCS#8 PEM private key, SubjectPublicKeyInfo PEM).
pub fn generate_issuer_key() -> WalletResult<(String, String)> {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| WalletError::BadVoucher("key generation failed"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref())
        .map_err(|_| WalletError::BadVoucher("generated key rejected"))?;
    let spki = pair
        .public_key()
        .as_der()
        .map_err(|_| WalletError::BadVoucher("public key encoding"))?;
    let private = pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec()));
    let public = pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec()));
    Ok((private, public))
}

/// The DER inside a PEM block with the given tag (`PRIVATE KEY`, `PUBLIC KEY`).
pub fn pem_der(text: &str, tag: &str) -> WalletResult<Vec<u8>> {
    crate::pki::pem_der(text, tag).map_err(|_| WalletError::BadVoucher("no such PEM block"))
}

/// Issues a voucher with a fresh random id, signed with the issuer's
/// PKCS#8 DER key. Returns the voucher and its encoding.
pub fn issue(
    issuer_pkcs8_der: &[u8],
    user: &str,
    amount: Amount,
    expiry_ms: i64,
) -> WalletResult<(Voucher, Vec<u8>)> {
    check_id("user", user)?;
    if amount.minor <= 0 || amount.minor > super::MAX_AMOUNT {
        return Err(WalletError::InvalidAmount);
    }
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, issuer_pkcs8_der)
        .map_err(|_| WalletError::BadVoucher("issuer key is not a P-256 PKCS#8 key"))?;
    let mut id = [0u8; 16];
    rand::fill(&mut id);
    let voucher = Voucher {
        id,
        user: user.into(),
        amount,
        expiry_ms,
    };
    let sig = pair
        .sign(&SystemRandom::new(), &voucher.body())
        .map_err(|_| WalletError::BadVoucher("signing failed"))?;
    let signed = Signed {
        voucher: voucher.clone(),
        signature: sig.as_ref().to_vec(),
    };
    Ok((voucher, signed.encode()))
}

/// Checks the issuer's signature (key as SPKI DER or uncompressed point)
/// and the expiry. Single use is the ledger's job.
pub fn verify(issuer_public: &[u8], bytes: &[u8], now_ms: i64) -> WalletResult<Voucher> {
    let s = Signed::decode(bytes)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, issuer_public)
        .verify(&s.voucher.body(), &s.signature)
        .map_err(|_| WalletError::BadVoucher("signature"))?;
    if now_ms >= s.voucher.expiry_ms {
        return Err(WalletError::BadVoucher("expired"));
    }
    if s.voucher.amount.minor <= 0 || s.voucher.amount.minor > super::MAX_AMOUNT {
        return Err(WalletError::InvalidAmount);
    }
    Ok(s.voucher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (Vec<u8>, Vec<u8>) {
        let (private, public) = generate_issuer_key().unwrap();
        (
            pem_der(&private, "PRIVATE KEY").unwrap(),
            pem_der(&public, "PUBLIC KEY").unwrap(),
        )
    }

    #[test]
    fn issued_vouchers_verify_and_round_trip() {
        let (sk, pk) = keys();
        let amount = Amount::new(5000, "EUR").unwrap();
        let (v, bytes) = issue(&sk, "alice", amount, 2_000).unwrap();
        assert_eq!(verify(&pk, &bytes, 1_000).unwrap(), v);
        let s = Signed::decode(&bytes).unwrap();
        assert_eq!(s.encode(), bytes);
        assert_eq!(s.voucher.user, "alice");
        assert_eq!(
            verify(&pk, &bytes, 2_000),
            Err(WalletError::BadVoucher("expired"))
        );
    }

    #[test]
    fn another_issuer_or_any_changed_byte_is_refused() {
        let (sk, pk) = keys();
        let (_, other_pk) = keys();
        let (_, bytes) = issue(&sk, "alice", Amount::new(5000, "EUR").unwrap(), 2_000).unwrap();
        assert!(verify(&other_pk, &bytes, 0).is_err());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(verify(&pk, &b, 0).is_err(), "byte {i}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            verify(&pk, &longer, 0),
            Err(WalletError::BadVoucher("trailing bytes"))
        );
    }

    #[test]
    fn junk_never_panics() {
        let (sk, pk) = keys();
        let (_, bytes) = issue(&sk, "alice", Amount::new(1, "JPY").unwrap(), 2_000).unwrap();
        for n in 0..bytes.len() {
            assert!(Signed::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut x = 0x9e37_79b9_u32;
        for len in [0usize, 1, 20, 40, 60, 100, 300] {
            let mut junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            assert!(verify(&pk, &junk, 0).is_err());
            if junk.len() >= LABEL.len() {
                junk[..LABEL.len()].copy_from_slice(LABEL);
                assert!(verify(&pk, &junk, 0).is_err());
            }
        }
        assert!(issue(b"not a key", "alice", Amount::new(1, "EUR").unwrap(), 1).is_err());
        assert!(pem_der("junk", "PRIVATE KEY").is_err());
    }

    #[test]
    fn bad_fields_are_refused_at_issue() {
        let (sk, _) = keys();
        assert_eq!(
            issue(&sk, "alice", Amount::new(0, "EUR").unwrap(), 1).unwrap_err(),
            WalletError::InvalidAmount
        );
        assert!(issue(&sk, "al ice", Amount::new(1, "EUR").unwrap(), 1).is_err());
    }
}
