//! The ledger's HMAC chain: each entry's MAC covers the previous entry's
//! MAC and the entry's own fields, so changing, removing or reordering any
//! entry breaks every MAC after it. Removing the last entries breaks none:
//! that is what the anchors (`super::anchor`) catch.
//!
//! ```text
//! prev_mac (32 zero bytes for seq 1) ─┐
//! canonical(entry) ───────────────────┴─► ChainMac::mac ─► entry.mac ─► next entry's prev_mac
//! ```
//!
//! The key lives in the HSM (`kb-ledger-mac`, generic secret, sign/verify
//! only, never extractable): someone who can write the database but cannot
//! use the token cannot forge entries. Each entry is MACed with that day's
//! key, `HMAC(kb-ledger-mac, "keybroker ledger day key v1" ‖ day)`, derived
//! in the HSM once per day and held by the writer (docs/DECISIONS.md, "The
//! wallet"). Anchors of the chain's head (`super::anchor`) are MAC'd with
//! `kb-ledger-mac` itself, in the HSM, one `C_Sign` each
//! ([`ChainMac::anchor_mac`]). [`SoftChainMac`] exists for unit tests of
//! the chain logic only.

use super::{Entry, WalletError, WalletResult};
use crate::hsm::{Ctx, Hsm, HsmError, labels};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use std::sync::{Arc, Mutex};

/// The MAC of the first entry's predecessor.
pub const GENESIS: [u8; 32] = [0; 32];

const DOMAIN: &[u8] = b"keybroker ledger entry v1";

/// A keyed MAC over ledger data. Implementations keep the key out of reach
/// of the database.
pub trait ChainMac: Send + Sync {
    /// The MAC of `data` for an entry made on `day` (days since the epoch).
    fn mac(&self, day: i64, data: &[u8]) -> Result<[u8; 32], WalletError>;
    /// The MAC of an anchor record's canonical form
    /// ([`super::anchor::Anchor::mac_input`]), made with the long-term key
    /// itself, not a day key: a day key read from memory forges no anchor.
    fn anchor_mac(&self, data: &[u8]) -> Result<[u8; 32], WalletError>;
}

fn tag32(tag: &[u8]) -> WalletResult<[u8; 32]> {
    tag.try_into()
        .map_err(|_| WalletError::mac("HMAC-SHA256 tag is not 32 bytes"))
}

const DAY_MS: i64 = 86_400_000;
const DAY_KEY: &[u8] = b"keybroker ledger day key v1";

/// Appends `s` with a big-endian u32 length prefix.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// `prev_mac ‖ canonical(entry)`: a domain label, then every field in a
/// fixed order, integers big-endian, strings length-prefixed.
pub fn mac_input(e: &Entry, prev_mac: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        32 + DOMAIN.len()
            + 96
            + e.user.len()
            + e.decision_id.len()
            + e.market.len()
            + e.order_ref.len()
            + e.idempotency_key.len()
            + e.voucher_id.len(),
    );
    out.extend_from_slice(prev_mac);
    put_str(&mut out, DOMAIN);
    out.extend_from_slice(&e.seq.to_be_bytes());
    put_str(&mut out, e.user.as_bytes());
    put_str(&mut out, e.kind.as_str().as_bytes());
    put_str(&mut out, e.decision_id.as_bytes());
    out.extend_from_slice(&e.amount.minor.to_be_bytes());
    out.extend_from_slice(&e.amount.currency.bytes());
    out.extend_from_slice(&e.balance_after.to_be_bytes());
    put_str(&mut out, e.market.as_bytes());
    put_str(&mut out, e.order_ref.as_bytes());
    put_str(&mut out, e.idempotency_key.as_bytes());
    put_str(&mut out, e.voucher_id.as_bytes());
    out.extend_from_slice(&e.created_ms.to_be_bytes());
    out
}

/// The MAC `e` should carry after `prev_mac`.
pub fn entry_mac(m: &dyn ChainMac, e: &Entry, prev_mac: &[u8; 32]) -> WalletResult<[u8; 32]> {
    m.mac(e.created_ms.div_euclid(DAY_MS), &mac_input(e, prev_mac))
}

/// HMAC-SHA256 in process. For unit tests of the chain logic only: the
/// key is in memory.
pub struct SoftChainMac(aws_lc_rs::hmac::Key);

impl SoftChainMac {
    pub fn new(key: &[u8]) -> Self {
        Self(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key))
    }
}

impl ChainMac for SoftChainMac {
    fn mac(&self, _day: i64, data: &[u8]) -> WalletResult<[u8; 32]> {
        tag32(aws_lc_rs::hmac::sign(&self.0, data).as_ref())
    }
    fn anchor_mac(&self, data: &[u8]) -> WalletResult<[u8; 32]> {
        self.mac(0, data)
    }
}

/// `CKM_SHA256_HMAC` with the token key `kb-ledger-mac`, on a session of
/// its own. Build it on the thread that uses it (the ledger writer): a
/// PKCS#11 session belongs to one thread. The mutex is never contended;
/// it only makes the type `Sync`.
pub struct HsmChainMac {
    hsm: Arc<Hsm>,
    session: Mutex<MacSession>,
    /// Day keys derived so far (bounded; an audit over a long history
    /// derives them again as needed).
    days: Mutex<std::collections::HashMap<i64, aws_lc_rs::hmac::Key>>,
}

const MAX_DAY_KEYS: usize = 1024;

/// A session, the HSM epoch it was opened in, and the `kb-ledger-mac`
/// handle found on it.
struct MacSession {
    session: Session,
    epoch: u64,
    key: ObjectHandle,
}

/// An HSM failure under the chain MAC, the HSM's error kept as its
/// source. One that lost the session (the HSM restarting, the token away)
/// may pass on a retry, once the HSM is back: the broker answers it `busy`.
fn hsm_err(e: HsmError) -> WalletError {
    let retry = e.session_lost();
    WalletError::Mac(super::Cause::of(e.to_string(), e, retry))
}

impl HsmChainMac {
    pub fn new(hsm: Arc<Hsm>) -> WalletResult<Self> {
        let epoch = hsm.epoch();
        let session = hsm.session().map_err(hsm_err)?;
        Ok(Self {
            session: Mutex::new(Self::with_key(&hsm, session, epoch)?),
            hsm,
            days: Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn with_key(hsm: &Hsm, session: Session, epoch: u64) -> WalletResult<MacSession> {
        let key = hsm
            .find(&session, labels::LEDGER_MAC, ObjectClass::SECRET_KEY)
            .map_err(hsm_err)?
            .ok_or_else(|| {
                WalletError::mac(format!(
                    "key pkcs11:token={};object={} missing; run `keybroker init`",
                    hsm.token(),
                    labels::LEDGER_MAC
                ))
            })?;
        Ok(MacSession {
            session,
            epoch,
            key,
        })
    }

    /// `HMAC(kb-ledger-mac, input)`, computed in the HSM.
    fn sign(&self, input: &[u8]) -> WalletResult<zeroize::Zeroizing<Vec<u8>>> {
        let mut s = self
            .session
            .lock()
            .map_err(|_| WalletError::mac("session lock poisoned"))?;
        let derive = |m: &MacSession| {
            m.session
                .sign(&Mechanism::Sha256Hmac, m.key, input)
                .op("C_Sign (SHA256_HMAC)")
        };
        // A session lost to an HSM restart is replaced here, through the
        // HSM's own recovery (new login, new epoch), and the key is found
        // again on it: handles may change with the sessions.
        let raw = match derive(&s) {
            Err(e) if e.session_lost() => {
                let (session, epoch) = self.hsm.recover(s.epoch).map_err(hsm_err)?;
                *s = Self::with_key(&self.hsm, session, epoch)?;
                derive(&s).map_err(hsm_err)?
            }
            r => r.map_err(hsm_err)?,
        };
        Ok(zeroize::Zeroizing::new(raw))
    }

    /// The day's key, derived in the HSM on first use.
    fn day_key(&self, day: i64) -> WalletResult<aws_lc_rs::hmac::Key> {
        let mut days = self
            .days
            .lock()
            .map_err(|_| WalletError::mac("day key lock poisoned"))?;
        if let Some(k) = days.get(&day) {
            return Ok(k.clone());
        }
        let raw = self.sign(&[DAY_KEY, &day.to_be_bytes()].concat())?;
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &raw);
        if days.len() >= MAX_DAY_KEYS {
            days.clear();
        }
        days.insert(day, k.clone());
        Ok(k)
    }
}

impl ChainMac for HsmChainMac {
    fn mac(&self, day: i64, data: &[u8]) -> WalletResult<[u8; 32]> {
        tag32(aws_lc_rs::hmac::sign(&self.day_key(day)?, data).as_ref())
    }
    fn anchor_mac(&self, data: &[u8]) -> WalletResult<[u8; 32]> {
        tag32(&self.sign(data)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallet::{Amount, EntryKind};

    fn entry(seq: i64) -> Entry {
        Entry {
            seq,
            user: "alice".into(),
            kind: EntryKind::Purchase,
            decision_id: "d1".into(),
            amount: Amount::new(100, "EUR").unwrap(),
            balance_after: 900,
            market: "m1".into(),
            order_ref: "o".into(),
            idempotency_key: "k".into(),
            voucher_id: String::new(),
            created_ms: 1,
            prev_mac: GENESIS,
            mac: GENESIS,
        }
    }

    #[test]
    fn every_field_and_the_predecessor_are_covered() {
        let m = SoftChainMac::new(b"k");
        let base = entry(1);
        let mac = entry_mac(&m, &base, &GENESIS).unwrap();
        assert_eq!(mac, entry_mac(&m, &base.clone(), &GENESIS).unwrap());
        type Change = Box<dyn Fn(&mut Entry)>;
        let variants: Vec<Change> = vec![
            Box::new(|e| e.seq = 2),
            Box::new(|e| e.user = "alicf".into()),
            Box::new(|e| e.kind = EntryKind::Cancel),
            Box::new(|e| e.decision_id = "d2".into()),
            Box::new(|e| e.amount.minor = 101),
            Box::new(|e| e.amount = Amount::new(100, "USD").unwrap()),
            Box::new(|e| e.balance_after = 901),
            Box::new(|e| e.market = "m2".into()),
            Box::new(|e| e.order_ref = "p".into()),
            Box::new(|e| e.idempotency_key = "l".into()),
            Box::new(|e| e.voucher_id = "v".into()),
            Box::new(|e| e.created_ms = 2),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut e = base.clone();
            change(&mut e);
            assert_ne!(entry_mac(&m, &e, &GENESIS).unwrap(), mac, "field {i}");
        }
        assert_ne!(entry_mac(&m, &base, &[1; 32]).unwrap(), mac);
        assert_ne!(
            entry_mac(&SoftChainMac::new(b"other"), &base, &GENESIS).unwrap(),
            mac
        );
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let m = SoftChainMac::new(b"k");
        let mut a = entry(1);
        let mut b = entry(1);
        a.market = "ab".into();
        a.order_ref = "c".into();
        b.market = "a".into();
        b.order_ref = "bc".into();
        assert_ne!(
            entry_mac(&m, &a, &GENESIS).unwrap(),
            entry_mac(&m, &b, &GENESIS).unwrap()
        );
    }

    /// A MAC failure from a lost HSM session says a retry may pass (the
    /// broker answers `busy`) and keeps the PKCS#11 error below it; a
    /// malformed answer does not.
    #[test]
    fn a_lost_hsm_session_under_the_mac_is_retryable_with_its_source() {
        use cryptoki::context::Function;
        use cryptoki::error::{Error, RvError};
        let lost = hsm_err(HsmError::Pkcs11 {
            op: "C_Sign (SHA256_HMAC)",
            source: Error::Pkcs11(RvError::SessionClosed, Function::Sign),
        });
        assert!(lost.retryable(), "{lost}");
        let cause = std::error::Error::source(&lost).expect("the cause");
        assert!(cause.source().is_some_and(|e| e.is::<HsmError>()));
        assert!(!hsm_err(HsmError::Format("a short tag")).retryable());
    }
}
