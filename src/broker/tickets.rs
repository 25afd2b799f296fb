//! TLS 1.3 session tickets whose keys come from an HSM key, so that every
//! broker node sharing the HSM accepts every other node's tickets; whose
//! issue time is under the AEAD, so that a ticket dies at the lifetime it
//! was advertised with whatever the key rotation does; and which resume at
//! most once on each node.
//!
//! ```text
//! epoch(t)   = t / period                                   (t: Unix seconds)
//! key(epoch) = HMAC-SHA256(kb-ticket-key in the HSM, "keybroker ticket key v1" ‖ epoch:u32)
//! ticket     = version:u8 = 2 ‖ issued:u64 ‖ nonce:[12]
//!              ‖ AES-256-GCM(key(epoch(issued)), nonce, aad = version ‖ issued, state)
//! ```
//!
//! A ticket opens when all of these hold (docs/DECISIONS.md, "Session
//! tickets", has the argument):
//!
//! - its AEAD opens under the key of its issue epoch (the node keeps the
//!   previous, current and next epochs' keys; the next covers clock skew
//!   between nodes);
//! - `now - lifetime <= issued <= now + SKEW`: the lifetime is the one
//!   rustls advertised in the NewSessionTicket ([`HsmTicketer::lifetime`]),
//!   at most one key period, so the previous epoch's key is never what
//!   lets an old ticket through;
//! - it was issued at or after this node's horizon: the node's start, or
//!   the end of the oldest tickets it had to forget (below);
//! - its nonce is not in the node's set of used tickets. Accepting it puts
//!   it there.
//!
//! The used set holds one entry per ticket accepted, filed by slice of
//! issue time (1/16 of the lifetime); a slice goes as a whole once every
//! ticket issued in it is past its lifetime. It is bounded: when full, the
//! oldest slice goes early and the horizon moves past it, so the tickets of
//! that slice are refused from then on (a full handshake), never accepted a
//! second time. Under a load the set cannot hold for a whole lifetime,
//! tickets live shorter; they never resume twice on one node.

use crate::hsm::{Ctx, Hsm, HsmResult};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectClass;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

const LABEL: &[u8] = b"keybroker ticket key v1";
/// The ticket format above; also in the AAD.
const VERSION: u8 = 2;
const HEADER: usize = 1 + 8 + NONCE_LEN;
const TAG: usize = 16;
/// How far in the future a ticket's issue time may be (another node's
/// clock running ahead), seconds.
pub const SKEW: u64 = 60;
/// Slices of issue time per lifetime in the used set.
const SLICES: u64 = 16;

/// What became of a ticket a client offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Accepted on this node before.
    Reused,
    /// Older than its lifetime, or from further in the future than [`SKEW`].
    Expired,
    /// Issued before this node's horizon: before it started, or in a slice
    /// of the used set that had to go for room.
    Forgotten,
    /// Not a ticket of ours: malformed, unknown epoch, or the AEAD failed.
    Invalid,
}

impl Verdict {
    #[cfg(test)]
    const ALL: [Verdict; 5] = [
        Self::Accepted,
        Self::Reused,
        Self::Expired,
        Self::Forgotten,
        Self::Invalid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Reused => "reused",
            Self::Expired => "expired",
            Self::Forgotten => "forgotten",
            Self::Invalid => "invalid",
        }
    }
}

/// The tickets accepted on this node, by slice of issue time.
struct Used {
    /// Slice index (issued / slice length) → the nonces accepted. A nonce
    /// is random, made by a broker, and authenticated by the AEAD before it
    /// gets here, so its first 8 bytes identify it: two tickets sharing
    /// them (odds 2^-64 a pair) would only make the second fall back to a
    /// full handshake.
    slices: BTreeMap<u64, HashSet<u64>>,
    len: usize,
    /// Tickets issued before this second are refused.
    horizon: u64,
}

impl Used {
    fn admit(&mut self, issued: u64, nonce: u64, now: u64, t: &Limits) -> Verdict {
        // Slices whose every ticket is past its lifetime go first.
        while let Some((&s, _)) = self.slices.first_key_value() {
            if (s + 1) * t.slice + t.lifetime > now {
                break;
            }
            self.drop_oldest();
        }
        if issued < self.horizon {
            return Verdict::Forgotten;
        }
        let slice = issued / t.slice;
        if self.slices.get(&slice).is_some_and(|n| n.contains(&nonce)) {
            return Verdict::Reused;
        }
        while self.len >= t.capacity {
            let gone = self.drop_oldest();
            self.horizon = self.horizon.max((gone + 1) * t.slice);
        }
        if issued < self.horizon {
            return Verdict::Forgotten;
        }
        self.slices.entry(slice).or_default().insert(nonce);
        self.len += 1;
        Verdict::Accepted
    }

    /// Drops the oldest slice; returns its index.
    fn drop_oldest(&mut self) -> u64 {
        let (s, nonces) = self.slices.pop_first().expect("a slice to drop");
        self.len -= nonces.len();
        s
    }
}

struct Limits {
    lifetime: u64,
    slice: u64,
    capacity: usize,
}

pub struct HsmTicketer {
    period: Duration,
    limits: Limits,
    keys: RwLock<BTreeMap<u32, LessSafeKey>>,
    used: Mutex<Used>,
}

impl std::fmt::Debug for HsmTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmTicketer")
            .field("period", &self.period)
            .field("lifetime", &self.limits.lifetime)
            .field("capacity", &self.limits.capacity)
            .finish_non_exhaustive()
    }
}

fn epoch_at(secs: u64, period: Duration) -> u32 {
    (secs / period.as_secs().max(1)) as u32
}

/// The ticket's first 9 bytes, authenticated: version ‖ issued.
fn aad(issued: u64) -> [u8; 9] {
    let mut a = [VERSION; 9];
    a[1..].copy_from_slice(&issued.to_be_bytes());
    a
}

fn unix_now() -> u64 {
    crate::clock::now().as_secs()
}

impl HsmTicketer {
    /// Derives the keys around now; fails if the HSM key is missing.
    /// `lifetime` (seconds, at most `period`) is what tickets are
    /// advertised and held to; `capacity` bounds the used set.
    pub fn new(
        hsm: &Hsm,
        period: Duration,
        lifetime: u64,
        capacity: usize,
    ) -> HsmResult<Arc<Self>> {
        let t = Arc::new(Self::empty(period, lifetime, capacity, unix_now()));
        t.refresh(hsm)?;
        Ok(t)
    }

    /// No keys yet; refuses tickets issued before `start`.
    fn empty(period: Duration, lifetime: u64, capacity: usize, start: u64) -> Self {
        let lifetime = lifetime.clamp(1, period.as_secs().max(1));
        Self {
            period,
            limits: Limits {
                lifetime,
                slice: (lifetime / SLICES).max(1),
                capacity: capacity.max(1),
            },
            keys: RwLock::new(BTreeMap::new()),
            used: Mutex::new(Used {
                slices: BTreeMap::new(),
                len: 0,
                horizon: start,
            }),
        }
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
        let now = epoch_at(unix_now(), self.period);
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

    /// Seals `plain` as a ticket issued at `issued` (Unix seconds).
    fn seal(&self, plain: &[u8], issued: u64) -> Option<Vec<u8>> {
        let keys = self.keys.read().ok()?;
        let key = keys.get(&epoch_at(issued, self.period))?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let aad = aad(issued);
        let mut out = Vec::with_capacity(HEADER + plain.len() + TAG);
        out.extend_from_slice(&aad);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[HEADER..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens a ticket a client offered at `now` (Unix seconds).
    fn open(&self, cipher: &[u8], now: u64) -> Result<Vec<u8>, Verdict> {
        if cipher.len() < HEADER + TAG || cipher[0] != VERSION {
            return Err(Verdict::Invalid);
        }
        let issued = u64::from_be_bytes(cipher[1..9].try_into().expect("8 bytes"));
        let nonce: [u8; NONCE_LEN] = cipher[9..HEADER].try_into().expect("a nonce");
        let mut buf = cipher[HEADER..].to_vec();
        let n = {
            let keys = self.keys.read().map_err(|_| Verdict::Invalid)?;
            let key = keys
                .get(&epoch_at(issued, self.period))
                .ok_or(Verdict::Invalid)?;
            key.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(issued)),
                &mut buf,
            )
            .map_err(|_| Verdict::Invalid)?
            .len()
        };
        buf.truncate(n);
        if issued > now + SKEW || now.saturating_sub(issued) > self.limits.lifetime {
            return Err(Verdict::Expired);
        }
        let id = u64::from_be_bytes(nonce[..8].try_into().expect("8 bytes"));
        match self
            .used
            .lock()
            .map_err(|_| Verdict::Invalid)?
            .admit(issued, id, now, &self.limits)
        {
            Verdict::Accepted => Ok(buf),
            refused => Err(refused),
        }
    }
}

impl rustls::server::ProducesTickets for HsmTicketer {
    fn enabled(&self) -> bool {
        true
    }

    /// What rustls advertises in each NewSessionTicket, and what
    /// [`HsmTicketer::open`] holds the ticket to.
    fn lifetime(&self) -> u32 {
        self.limits.lifetime as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let t = self.seal(plain, unix_now());
        if t.is_some() {
            crate::metrics::ticket("issued");
        }
        t
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let r = self.open(cipher, unix_now());
        crate::metrics::ticket(r.as_ref().map_or_else(|v| v.name(), |_| "accepted"));
        r.ok()
    }
}

/// True when `conn` resumed a session whose terminal certificate is no
/// longer within its validity. rustls restores the certificate from the
/// ticket and does not run the client verifier on a resumption, so the
/// validity a full handshake checks is checked here, against now.
pub fn resumed_past_validity(conn: &rustls::ServerConnection) -> bool {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return false;
    }
    let now = x509_parser::time::ASN1Time::now();
    !conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .all(|c| {
            x509_parser::parse_x509_certificate(c).is_ok_and(|(_, c)| c.validity().is_valid_at(now))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verdict_has_its_metric_series() {
        let names = Verdict::ALL.map(Verdict::name);
        assert_eq!(names, crate::metrics::TICKET_VERDICTS);
    }
    use rustls::server::ProducesTickets;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A ticketer with keys made from `key` around `now`, as if started at
    /// `now - 7200`.
    fn ticketer(key: u8, lifetime: u64, capacity: usize, now: u64) -> HsmTicketer {
        let t = HsmTicketer::empty(HOUR, lifetime, capacity, now - 7200);
        let e = epoch_at(now, HOUR);
        let mut keys = t.keys.write().unwrap();
        for e in [e - 2, e - 1, e, e + 1] {
            let k = UnboundKey::new(&AES_256_GCM, &[key.wrapping_add(e as u8); 32]).unwrap();
            keys.insert(e, LessSafeKey::new(k));
        }
        drop(keys);
        t
    }

    #[test]
    fn tickets_open_on_any_node_with_the_same_keys_only() {
        let now = unix_now();
        let (a, b, other) = (
            ticketer(1, 3600, 100, now),
            ticketer(1, 3600, 100, now),
            ticketer(2, 3600, 100, now),
        );
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
        assert_eq!(other.open(&t, now), Err(Verdict::Invalid));
        let mut forged = t.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(a.open(&forged, now), Err(Verdict::Invalid));
        assert_eq!(a.open(&t[..10], now), Err(Verdict::Invalid));
    }

    #[test]
    fn a_ticket_resumes_once_per_node() {
        let now = unix_now();
        let (a, b) = (ticketer(1, 3600, 100, now), ticketer(1, 3600, 100, now));
        let t = a.seal(b"state", now).unwrap();
        assert_eq!(a.open(&t, now).unwrap(), b"state");
        assert_eq!(a.open(&t, now + 1), Err(Verdict::Reused));
        // Another node keeps its own set (docs/DECISIONS.md says why).
        assert_eq!(b.open(&t, now).unwrap(), b"state");
        assert_eq!(b.open(&t, now), Err(Verdict::Reused));
    }

    #[test]
    fn the_issue_time_is_authenticated_and_bounds_the_age() {
        let now = unix_now();
        let a = ticketer(1, 600, 100, now);
        assert_eq!(a.lifetime(), 600);
        let old = a.seal(b"state", now - 601).unwrap();
        assert_eq!(a.open(&old, now), Err(Verdict::Expired));
        // Within the same key epoch or not, the age is what counts.
        let edge = a.seal(b"state", now - 600).unwrap();
        assert!(a.open(&edge, now).is_ok());
        let future = a.seal(b"state", now + SKEW + 1).unwrap();
        assert_eq!(a.open(&future, now), Err(Verdict::Expired));
        // Making an old ticket look young breaks the AEAD.
        let mut young = old.clone();
        young[1..9].copy_from_slice(&now.to_be_bytes());
        assert_eq!(a.open(&young, now), Err(Verdict::Invalid));
    }

    #[test]
    fn the_lifetime_is_at_most_the_key_period() {
        let now = unix_now();
        let a = ticketer(1, 10 * 3600, 100, now);
        assert_eq!(a.lifetime(), 3600);
        // A ticket from the previous epoch's key, past the period, is refused.
        let t = a.seal(b"state", now - 3601).unwrap();
        assert_eq!(a.open(&t, now), Err(Verdict::Expired));
    }

    #[test]
    fn tickets_from_before_the_node_started_are_refused() {
        let now = unix_now();
        let a = HsmTicketer::empty(HOUR, 3600, 100, now);
        let keyed = ticketer(1, 3600, 100, now);
        *a.keys.write().unwrap() = std::mem::take(&mut *keyed.keys.write().unwrap());
        let before = a.seal(b"state", now - 1).unwrap();
        assert_eq!(a.open(&before, now), Err(Verdict::Forgotten));
        let after = a.seal(b"state", now).unwrap();
        assert!(a.open(&after, now).is_ok());
    }

    #[test]
    fn a_full_set_forgets_its_oldest_slice_and_refuses_those_tickets() {
        let now = unix_now();
        // Lifetime 1600 s: slices of 100 s. Room for 3 used tickets.
        let a = ticketer(1, 1600, 3, now);
        let at = |s: u64| now - 1500 + s * 100;
        let old = a.seal(b"state", at(0)).unwrap();
        let old_unused = a.seal(b"state", at(0)).unwrap();
        for t in [
            &old,
            &a.seal(b"s", at(1)).unwrap(),
            &a.seal(b"s", at(2)).unwrap(),
        ] {
            assert!(a.open(t, now).is_ok());
        }
        // Full: the fourth pushes the oldest slice out...
        assert!(a.open(&a.seal(b"s", at(3)).unwrap(), now).is_ok());
        // ...so neither a used nor an unused ticket of that slice resumes.
        assert_eq!(a.open(&old, now), Err(Verdict::Forgotten));
        assert_eq!(a.open(&old_unused, now), Err(Verdict::Forgotten));
        assert!(a.used.lock().unwrap().len <= 3);
        // A slice whose tickets have all expired goes without moving the horizon.
        let later = now + 300;
        let fresh = a.seal(b"s", later).unwrap();
        assert!(a.open(&fresh, later).is_ok());
        let used = a.used.lock().unwrap();
        assert_eq!(used.horizon, (at(0) / 100 + 1) * 100);
        assert!(!used.slices.contains_key(&(at(1) / 100)));
    }
}
