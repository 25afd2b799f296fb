//! Purchase receipts: the decision, signed by the user's home-card key,
//! with the user's certificate so a market can check it on its own.
//!
//! ```text
//! broker: ledger decision ─► body ─► HSM signs (user key) ─► SignedReceipt ─► terminal
//! terminal ─► market (direct channel) ─► user cert chains to the user CA ─► signature over body
//! ```

use crate::proto::access::{MAX_BLOB, MAX_REF, MAX_SIGNATURE, MAX_USER};
use crate::proto::wire::{Put, Reader, WireError};

pub const LABEL: &[u8] = b"keybroker receipt v1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub decision_id: String,
    pub user: String,
    pub market: String,
    pub amount_minor: i64,
    pub currency: [u8; 3],
    pub order_ref: String,
    pub created_ms: i64,
}

impl Receipt {
    /// The signed bytes.
    pub fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(160);
        v.extend_from_slice(LABEL);
        v.put_bytes(self.decision_id.as_bytes());
        v.put_bytes(self.user.as_bytes());
        v.put_bytes(self.market.as_bytes());
        v.put_u64(self.amount_minor as u64);
        v.extend_from_slice(&self.currency);
        v.put_bytes(self.order_ref.as_bytes());
        v.put_u64(self.created_ms as u64);
        v
    }

    fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        if r.take(LABEL.len(), "label")? != LABEL {
            return Err(WireError::Invalid("label"));
        }
        let s = |r: &mut Reader<'_>, max, what| r.str(max, what).map(str::to_owned);
        let receipt = Self {
            decision_id: s(&mut r, MAX_USER, "decision_id")?,
            user: s(&mut r, MAX_USER, "user")?,
            market: s(&mut r, MAX_USER, "market")?,
            amount_minor: r.u64("amount")? as i64,
            currency: r.array("currency")?,
            order_ref: s(&mut r, MAX_REF, "order_ref")?,
            created_ms: r.u64("created")? as i64,
        };
        r.finish()?;
        Ok(receipt)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    /// ECDSA P-256 (DER) over [`Receipt::body`] by the user's home-card key.
    pub signature: Vec<u8>,
    /// DER of the user's certificate (issued by the user CA).
    pub user_cert: Vec<u8>,
}

impl SignedReceipt {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1024);
        v.put_bytes(&self.receipt.body());
        v.put_bytes(&self.signature);
        v.put_bytes(&self.user_cert);
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let receipt = Receipt::parse(r.bytes(1024, "body")?)?;
        let signature = r.bytes(MAX_SIGNATURE, "signature")?.to_vec();
        let user_cert = r.bytes(MAX_BLOB, "user_cert")?.to_vec();
        r.finish()?;
        Ok(Self {
            receipt,
            signature,
            user_cert,
        })
    }

    /// Whether the signature verifies under `point` (the user's key).
    pub fn verify(&self, point: &[u8]) -> bool {
        crate::exchange::verify_signature(point, &self.receipt.body(), &self.signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_and_refuse_junk() {
        let r = SignedReceipt {
            receipt: Receipt {
                decision_id: "d".repeat(32),
                user: "alice".into(),
                market: "m1".into(),
                amount_minor: 1250,
                currency: *b"EUR",
                order_ref: "order 7".into(),
                created_ms: 1_700_000_000_000,
            },
            signature: vec![1; 70],
            user_cert: vec![2; 500],
        };
        let wire = r.encode();
        assert_eq!(SignedReceipt::decode(&wire).unwrap(), r);
        for cut in [0, 1, 10, wire.len() - 1] {
            assert!(SignedReceipt::decode(&wire[..cut]).is_err());
        }
        let mut bad = wire.clone();
        bad[3] ^= 0x20; // inside the label
        assert!(SignedReceipt::decode(&bad).is_err());
    }
}
