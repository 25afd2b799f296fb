//! Registry rows sealed with an HSM key: each row of the registry carries
//! HMAC-SHA256 under `kb-registry-mac` over its canonical encoding, its own
//! key (user id, terminal fingerprint, market id) included, and a
//! generation that grows with every write.
//!
//! ```text
//! write: row ─Canon─► bytes ─RowMac (HSM C_Sign SHA256_HMAC)─► mac ─► stored beside the row
//! read:  row + mac ─► Seen (verified before? same bytes, same mac) ─no─► RowMac ─► equal? ─► row
//!                                                          └── generation older than seen ─► BadRow
//! ```
//!
//! Someone who can write the database but not use the token cannot make a
//! row that verifies: not edit one (a hash, a lock counter, a terminal's
//! user, a revocation), not insert one, not move one under another key,
//! since the key is inside the MAC. What a MAC cannot tell is an *older*
//! row that was once genuine, put back. Within a running process [`Seen`]
//! remembers the newest generation it has read or written of each row and
//! refuses an older one; a process that starts after the rollback has no
//! such memory (docs/SECURITY.md states the window).
//!
//! The key never leaves the HSM; each check is one HSM HMAC, tens of µs
//! in SoftHSM. [`Seen`] also remembers the rows verified so far by digest,
//! so the login path re-checks a row only when it changed.

use crate::hsm::{Ctx, Hsm, HsmError, labels};
use anyhow::Result;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// A keyed MAC over registry rows; implementations keep the key out of
/// reach of the database.
pub trait RowMac: Send {
    fn mac(&self, data: &[u8]) -> Result<[u8; 32]>;
}

/// `CKM_SHA256_HMAC` with the token key `kb-registry-mac` on a session of
/// its own: make one per thread (a PKCS#11 session belongs to one thread).
/// A session lost to an HSM restart is replaced through the HSM's own
/// recovery, and the key found again on the new one.
pub struct HsmRowMac {
    hsm: Arc<Hsm>,
    state: RefCell<(Session, u64, ObjectHandle)>,
}

impl HsmRowMac {
    pub fn new(hsm: Arc<Hsm>) -> Result<Self, HsmError> {
        let epoch = hsm.epoch();
        let state = Self::on(&hsm, hsm.session()?, epoch)?;
        Ok(Self {
            hsm,
            state: RefCell::new(state),
        })
    }

    fn on(hsm: &Hsm, s: Session, epoch: u64) -> Result<(Session, u64, ObjectHandle), HsmError> {
        let key = hsm.require(&s, labels::REGISTRY_MAC, ObjectClass::SECRET_KEY)?;
        Ok((s, epoch, key))
    }
}

impl RowMac for HsmRowMac {
    fn mac(&self, data: &[u8]) -> Result<[u8; 32]> {
        let mut st = self.state.borrow_mut();
        let sign = |(s, _, key): &(Session, u64, ObjectHandle)| {
            s.sign(&Mechanism::Sha256Hmac, *key, data)
                .op("C_Sign (SHA256_HMAC, registry)")
        };
        let tag = match sign(&st) {
            Err(e) if e.session_lost() => {
                let (s, epoch) = self.hsm.recover(st.1)?;
                *st = Self::on(&self.hsm, s, epoch)?;
                sign(&st)?
            }
            r => r?,
        };
        tag.as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("HMAC-SHA256 tag is not 32 bytes"))
    }
}

/// HMAC-SHA256 in process. For unit tests of the store only: the key is
/// in memory.
#[cfg(test)]
pub struct SoftRowMac(pub [u8; 32]);

#[cfg(test)]
impl RowMac for SoftRowMac {
    fn mac(&self, data: &[u8]) -> Result<[u8; 32]> {
        Ok(crate::crypto::hmac_sha256(&self.0, &[data]))
    }
}

const DOMAIN: &[u8] = b"keybroker registry row v1";

/// A row's canonical encoding: the domain, the table, the row's key, then
/// every field in a fixed order, integers big-endian, byte strings with a
/// u32 length before them.
pub struct Canon(Vec<u8>);

impl Canon {
    pub fn new(table: &str, key: &[u8]) -> Self {
        Self(Vec::with_capacity(1024))
            .bytes(DOMAIN)
            .bytes(table.as_bytes())
            .bytes(key)
    }

    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }

    pub fn int(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
}

/// Why a row was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// No MAC: inserted or stripped outside keybroker. (A registry from
    /// before row MACs is sealed by `keybroker init` when upgrading.)
    Unsealed,
    /// The MAC does not match the row: changed outside keybroker, or moved
    /// from another key.
    Mismatch,
    /// Genuine, but older than a generation this process has seen: put back.
    RolledBack { seen: i64, found: i64 },
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Unsealed => f.write_str("has no MAC"),
            Why::Mismatch => f.write_str("fails its MAC check"),
            Why::RolledBack { seen, found } => {
                write!(f, "is older (generation {found}) than one seen ({seen})")
            }
        }
    }
}

/// A registry row that fails its check: refused wherever it is read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("registry row {table}/{key} {why}")]
pub struct BadRow {
    pub table: &'static str,
    pub key: String,
    pub why: Why,
}

/// Bound of each of [`Seen`]'s two sets; when one is full it starts again
/// (verifications are redone; rollbacks of rows forgotten go unnoticed).
const MAX_SEEN: usize = 1 << 18;

/// What this process has verified: digests of (row, MAC) pairs that
/// passed, and the newest generation of each row. Shared by the threads
/// of one process.
#[derive(Default)]
pub struct Seen {
    inner: Mutex<SeenInner>,
}

#[derive(Default)]
struct SeenInner {
    verified: HashSet<[u8; 32]>,
    newest: HashMap<String, i64>,
}

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeenInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Seals rows and checks them: a [`RowMac`] and the process's [`Seen`].
pub struct Sealer {
    mac: Box<dyn RowMac>,
    seen: Arc<Seen>,
}

/// A row as the store read it: where it is, what it encodes to, its
/// generation and the MAC stored with it.
pub struct ReadRow<'a> {
    pub table: &'static str,
    pub key: String,
    pub canon: &'a Canon,
    pub generation: i64,
    pub mac: Option<&'a [u8]>,
}

impl Sealer {
    pub fn new(mac: Box<dyn RowMac>, seen: Arc<Seen>) -> Self {
        Self { mac, seen }
    }

    /// With the HSM's `kb-registry-mac`, on a session of this thread.
    pub fn hsm(hsm: Arc<Hsm>, seen: Arc<Seen>) -> Result<Self, HsmError> {
        Ok(Self::new(Box::new(HsmRowMac::new(hsm)?), seen))
    }

    /// The MAC a row with this encoding is stored with.
    pub fn seal(&self, canon: &Canon) -> Result<[u8; 32]> {
        self.mac.mac(&canon.0)
    }

    /// Records that this process wrote generation `generation` of the row.
    pub fn written(&self, table: &str, key: &str, generation: i64) {
        let mut seen = self.seen.lock();
        if seen.newest.len() >= MAX_SEEN {
            seen.newest.clear();
        }
        let newest = seen
            .newest
            .entry(format!("{table}/{key}"))
            .or_insert(generation);
        *newest = (*newest).max(generation);
    }

    /// Checks a row read from the database. `Err` is a [`BadRow`] (see
    /// `downcast_ref`) or a failure of the HSM.
    pub fn verify(&self, row: &ReadRow<'_>) -> Result<()> {
        let bad = |why| BadRow {
            table: row.table,
            key: row.key.clone(),
            why,
        };
        let Some(mac) = row.mac else {
            return Err(bad(Why::Unsealed).into());
        };
        let digest = {
            let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            d.update(&row.canon.0);
            d.update(mac);
            <[u8; 32]>::try_from(d.finish().as_ref()).expect("SHA-256 is 32 bytes")
        };
        let known = self.seen.lock().verified.contains(&digest);
        if !known {
            if !crate::crypto::ct_eq(&self.seal(row.canon)?, mac) {
                return Err(bad(Why::Mismatch).into());
            }
            let mut seen = self.seen.lock();
            if seen.verified.len() >= MAX_SEEN {
                seen.verified.clear();
            }
            seen.verified.insert(digest);
        }
        let seen = self
            .seen
            .lock()
            .newest
            .get(&format!("{}/{}", row.table, row.key))
            .copied();
        match seen {
            Some(seen) if seen > row.generation => Err(bad(Why::RolledBack {
                seen,
                found: row.generation,
            })
            .into()),
            _ => {
                self.written(row.table, &row.key, row.generation);
                Ok(())
            }
        }
    }
}

/// The generation a row written after generation `prev` gets: above
/// `prev`, and at least the clock in microseconds, so a row re-created or
/// unlocked later is newer than any copy of it from before.
pub fn next_gen(prev: i64) -> i64 {
    let now = i64::try_from(crate::clock::now().as_micros()).unwrap_or(i64::MAX);
    (prev + 1).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(Box::new(SoftRowMac([7; 32])), Arc::default())
    }

    fn stored<'a>(canon: &'a Canon, generation: i64, mac: Option<&'a [u8]>) -> ReadRow<'a> {
        ReadRow {
            table: "users",
            key: "bob".into(),
            canon,
            generation,
            mac,
        }
    }

    fn why(e: anyhow::Error) -> Why {
        e.downcast::<BadRow>().expect("a BadRow").why
    }

    #[test]
    fn keys_and_fields_are_apart() {
        let a = Canon::new("users", b"ab").bytes(b"c");
        let b = Canon::new("users", b"a").bytes(b"bc");
        let c = Canon::new("terminals", b"ab").bytes(b"c");
        assert_ne!(a.0, b.0);
        assert_ne!(a.0, c.0);
        assert_ne!(Canon::new("t", b"").int(1).0, Canon::new("t", b"").int(2).0);
    }

    #[test]
    fn edits_missing_macs_and_rollbacks_are_refused() {
        let s = sealer();
        let canon = Canon::new("users", b"bob").int(5);
        let mac = s.seal(&canon).unwrap();
        s.verify(&stored(&canon, 5, Some(&mac))).unwrap();
        // Again: from the cache, same answer.
        s.verify(&stored(&canon, 5, Some(&mac))).unwrap();
        let edited = Canon::new("users", b"bob").int(6);
        assert_eq!(
            why(s.verify(&stored(&edited, 5, Some(&mac))).unwrap_err()),
            Why::Mismatch
        );
        assert_eq!(
            why(s.verify(&stored(&canon, 5, None)).unwrap_err()),
            Why::Unsealed
        );
        // A newer generation written; the older genuine row comes back.
        s.written("users", "bob", 9);
        assert_eq!(
            why(s.verify(&stored(&canon, 5, Some(&mac))).unwrap_err()),
            Why::RolledBack { seen: 9, found: 5 }
        );
        // Another process (fresh memory) cannot tell.
        let other = Sealer::new(Box::new(SoftRowMac([7; 32])), Arc::default());
        other.verify(&stored(&canon, 5, Some(&mac))).unwrap();
        let foreign = Sealer::new(Box::new(SoftRowMac([8; 32])), Arc::default());
        assert_eq!(
            why(foreign.verify(&stored(&canon, 5, Some(&mac))).unwrap_err()),
            Why::Mismatch
        );
        assert!(next_gen(5) > 5 && next_gen(i64::MAX - 1) == i64::MAX);
    }
}
