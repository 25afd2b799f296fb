//! TLS 1.3 session tickets whose keys come from an HSM key, so that every
//! broker node sharing the HSM accepts every other node's tickets.
//!
//! ```text
//! epoch = unix time / period
//! key(epoch) = HMAC-SHA256(kb-ticket-key in the HSM, "keybroker ticket key v1" ‖ epoch)
//! ticket = epoch:u32 ‖ nonce:[12] ‖ AES-256-GCM(key(epoch), nonce, aad = epoch, state)
//! ```
//!
//! The node keeps the keys of the previous, current and next epochs (the
//! next one covers clock skew between nodes) and refreshes them from the
//! HSM on its rotation thread. A ticket lives for one period, so one from
//! the previous epoch is still accepted.

use crate::hsm::{Ctx, Hsm, HsmResult};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectClass;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LABEL: &[u8] = b"keybroker ticket key v1";

pub struct HsmTicketer {
    period: Duration,
    keys: RwLock<BTreeMap<u32, LessSafeKey>>,
}

impl std::fmt::Debug for HsmTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmTicketer")
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

fn epoch_at(t: SystemTime, period: Duration) -> u32 {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (secs / period.as_secs().max(1)) as u32
}

impl HsmTicketer {
    /// Derives the keys around now; fails if the HSM key is missing.
    pub fn new(hsm: &Hsm, period: Duration) -> HsmResult<Arc<Self>> {
        let t = Arc::new(Self {
            period,
            keys: RwLock::new(BTreeMap::new()),
        });
        t.refresh(hsm)?;
        Ok(t)
    }

    /// Re-derives the previous, current and next epochs' keys.
    pub fn refresh(&self, hsm: &Hsm) -> HsmResult<()> {
        let s = hsm.session()?;
        let key = hsm
            .find(&s, crate::hsm::labels::TICKET_KEY, ObjectClass::SECRET_KEY)?
            .ok_or_else(|| crate::hsm::HsmError::KeyNotFound {
                token: hsm.token().into(),
                label: crate::hsm::labels::TICKET_KEY.into(),
            })?;
        let now = epoch_at(SystemTime::now(), self.period);
        let mut fresh = BTreeMap::new();
        for e in [now.saturating_sub(1), now, now + 1] {
            let input = [LABEL, &e.to_be_bytes()].concat();
            let raw = zeroize::Zeroizing::new(
                s.sign(&Mechanism::Sha256Hmac, key, &input)
                    .op("C_Sign (SHA256_HMAC)")?,
            );
            let k = UnboundKey::new(&AES_256_GCM, &raw)
                .map_err(|_| crate::hsm::HsmError::Format("a bad ticket key"))?;
            fresh.insert(e, LessSafeKey::new(k));
        }
        *self.keys.write().expect("ticket keys") = fresh;
        Ok(())
    }
}

impl rustls::server::ProducesTickets for HsmTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.period.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let epoch = epoch_at(SystemTime::now(), self.period);
        let keys = self.keys.read().ok()?;
        let key = keys.get(&epoch)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(epoch.to_be_bytes()),
                &mut out[start..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 4 + NONCE_LEN + 16 {
            return None;
        }
        let epoch = u32::from_be_bytes(cipher[..4].try_into().ok()?);
        let nonce: [u8; NONCE_LEN] = cipher[4..4 + NONCE_LEN].try_into().ok()?;
        let keys = self.keys.read().ok()?;
        let key = keys.get(&epoch)?;
        let mut buf = cipher[4 + NONCE_LEN..].to_vec();
        let n = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(epoch.to_be_bytes()),
                &mut buf,
            )
            .ok()?
            .len();
        buf.truncate(n);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn ticketer(key: u8) -> HsmTicketer {
        let now = epoch_at(SystemTime::now(), Duration::from_secs(3600));
        let mut keys = BTreeMap::new();
        for e in [now - 1, now, now + 1] {
            let k = UnboundKey::new(&AES_256_GCM, &[key.wrapping_add(e as u8); 32]).unwrap();
            keys.insert(e, LessSafeKey::new(k));
        }
        HsmTicketer {
            period: Duration::from_secs(3600),
            keys: RwLock::new(keys),
        }
    }

    #[test]
    fn tickets_open_on_any_node_with_the_same_keys_only() {
        let (a, b, other) = (ticketer(1), ticketer(1), ticketer(2));
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
        assert!(other.decrypt(&t).is_none());
        let mut forged = t.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(b.decrypt(&forged).is_none());
        assert!(b.decrypt(&t[..10]).is_none());
    }
}
