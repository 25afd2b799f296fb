//! The reference market: accepts the broker's market channel, verifies each
//! brokered exchange, and serves the direct channel for the sessions it
//! agreed. Usable as a library by a merchant (`MarketState::exchange` and
//! `server::start`).
//!
//! ```text
//! broker ══market channel (TLS 1.3, mutual)══► verify batch ─► sessions{id → X, user, expiry}
//! terminal ──direct channel (AEAD records keyed from X)──► look up session ─► answer
//! ```

pub mod channel;
mod direct;
mod expiring;
pub mod orders;
pub mod server;
pub mod setup;

use crate::exchange::{self, Ephemeral, Transcript};
use crate::proto::ErrorCode;
use crate::proto::market::{Accepted, ExchangeRequest};
use anyhow::{Context, Result};
use expiring::Expiring;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::Zeroizing;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketConfig {
    /// The market id the broker registered; part of every transcript.
    pub id: String,
    /// Market-channel listener (TLS, the broker connects here).
    pub listen: SocketAddr,
    /// Direct-channel listener (terminals connect here).
    pub direct_listen: SocketAddr,
    /// Address advertised to terminals; default: the direct listener's.
    #[serde(default)]
    pub direct_endpoint: Option<String>,
    /// PEM files, relative to the config file's directory.
    pub key: PathBuf,
    pub cert: PathBuf,
    pub broker_ca: PathBuf,
    pub user_ca: PathBuf,
    /// The cancel-signing key and certificate (EKU documentSigning), apart
    /// from the TLS key. Default `cancel.key`, `cancel.crt`.
    #[serde(default = "cancel_key")]
    pub cancel_key: PathBuf,
    #[serde(default = "cancel_cert")]
    pub cancel_cert: PathBuf,
    /// The order book (SQLite): receipts accepted, cancellations. Default
    /// `orders.db`.
    #[serde(default = "orders_db")]
    pub orders_db: PathBuf,
    /// Time from accepting a receipt to delivering the goods, s: the window
    /// in which a cancel is authorised. Default 300.
    #[serde(default = "delivery_delay")]
    pub delivery_delay_s: u64,
    /// Oldest receipt accepted, by its `created_ms`, s. Default 600.
    #[serde(default = "receipt_max_age")]
    pub receipt_max_age_s: u64,
    /// Lifetime of a cancellation authorisation, s (at most 900, what the
    /// broker accepts). Default 300.
    #[serde(default = "cancel_auth_ttl")]
    pub cancel_auth_ttl_s: u64,
    /// Users allowed to trade here; `"*"` allows every certified user.
    #[serde(default = "all_users")]
    pub allowed_users: Vec<String>,
    /// Largest clock difference accepted on an exchange, ms. Default 30000.
    #[serde(default = "freshness")]
    pub freshness_ms: u64,
    /// Lifetime of a direct-channel session, s. Default 600.
    #[serde(default = "ttl")]
    pub session_ttl_s: u64,
    /// Most live sessions held. Default 1,000,000.
    #[serde(default = "max_sessions")]
    pub max_sessions: usize,
    /// Core threads; 0 = one per CPU.
    #[serde(default)]
    pub cores: usize,
    /// As the broker's `pin_cores` (`net::cores`). Default true.
    #[serde(default = "yes")]
    pub pin_cores: bool,
    /// A connection silent this long is closed, ms. Default 60000.
    #[serde(default = "idle")]
    pub idle_timeout_ms: u64,
    /// A direct connection must complete its Hello within this, ms, counted
    /// from accept (a byte at a time does not extend it). Default 5000.
    #[serde(default = "hello_timeout")]
    pub hello_timeout_ms: u64,
    /// Direct connections one session may open over its life. Bounds what
    /// a replayed Hello can make the market do. Default 16.
    #[serde(default = "connections_per_session")]
    pub max_connections_per_session: u32,
    /// Open direct connections per core; apart from the market channel's
    /// cap, so terminals cannot crowd out the broker. Default 10000.
    #[serde(default = "direct_per_core")]
    pub max_direct_connections_per_core: usize,
    /// Direct connections one source address may have before their Hello
    /// completes, on each core (0: no limit). Default 64.
    #[serde(default = "pending_per_source")]
    pub max_pending_per_source: u32,
    /// Live sessions one user may hold. A new exchange over it expires the
    /// user's oldest session no connection has used; when every one is in
    /// use it is refused `busy`. So one user cannot fill `max_sessions`
    /// for everyone. Default 1000.
    #[serde(default = "sessions_per_user")]
    pub max_sessions_per_user: usize,
}

fn pending_per_source() -> u32 {
    64
}
fn sessions_per_user() -> usize {
    1000
}

fn cancel_key() -> PathBuf {
    "cancel.key".into()
}
fn cancel_cert() -> PathBuf {
    "cancel.crt".into()
}
fn orders_db() -> PathBuf {
    "orders.db".into()
}
fn delivery_delay() -> u64 {
    300
}
fn receipt_max_age() -> u64 {
    600
}
fn cancel_auth_ttl() -> u64 {
    300
}
fn hello_timeout() -> u64 {
    5_000
}
fn connections_per_session() -> u32 {
    16
}
fn direct_per_core() -> usize {
    10_000
}

fn yes() -> bool {
    true
}

fn all_users() -> Vec<String> {
    vec!["*".into()]
}
fn freshness() -> u64 {
    30_000
}
fn ttl() -> u64 {
    600
}
fn max_sessions() -> usize {
    1_000_000
}
fn idle() -> u64 {
    60_000
}

impl MarketConfig {
    pub fn load(path: &Path) -> Result<(Self, PathBuf)> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(
            cfg.cancel_auth_ttl_s * 1000 <= crate::cancel_auth::MAX_LIFETIME_MS,
            "cancel_auth_ttl_s = {} is above what the broker accepts ({} s)",
            cfg.cancel_auth_ttl_s,
            crate::cancel_auth::MAX_LIFETIME_MS / 1000
        );
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((cfg, base))
    }
}

/// A direct-channel session the market agreed with a terminal's broker.
/// Its expiry is kept by the sessions map.
pub struct Session {
    pub x: Zeroizing<[u8; 32]>,
    pub user: String,
    /// Direct connections whose handshake completed.
    pub connections: u32,
}

/// A verified user certificate: its user id and public key.
#[derive(Clone)]
struct UserKey {
    user: String,
    point: Vec<u8>,
    not_after_ms: u64,
}

/// Everything the market's cores share.
pub struct MarketState {
    pub cfg: MarketConfig,
    /// The cancel-signing key and its certificate.
    signer: Option<(aws_lc_rs::signature::EcdsaKeyPair, Vec<u8>)>,
    orders: Mutex<orders::Orders>,
    pub endpoint: String,
    /// The user CA's certificate (DER), the anchor user certificates
    /// chain to.
    user_ca: Vec<u8>,
    certs: Mutex<HashMap<[u8; 32], UserKey>>,
    replay: Mutex<Replay>,
    sessions: Mutex<Expiring<[u8; 16], Session>>,
    /// Each user's session ids, oldest first (the quota's order). Locked
    /// after `sessions`, only to add a session.
    by_user: Mutex<UserIndex<std::collections::VecDeque<[u8; 16]>>>,
}

/// Something kept per user (its session ids, its nonces), oldest first.
/// What expired stays until its user adds again or the sweep that runs
/// once every `max_sessions` additions, so the index holds at most twice
/// what is live.
struct UserIndex<T> {
    users: HashMap<String, T>,
    added: usize,
}

impl<T> Default for UserIndex<T> {
    fn default() -> Self {
        Self {
            users: HashMap::new(),
            added: 0,
        }
    }
}

impl<T: Default> UserIndex<T> {
    /// Counts one addition; every `every` of them, keeps only the users
    /// for which `keep` (which may prune) is true.
    fn sweep(&mut self, every: usize, keep: impl FnMut(&mut T) -> bool) {
        self.added += 1;
        if self.added >= every {
            self.added = 0;
            let mut keep = keep;
            self.users.retain(|_, t| keep(t));
        }
    }

    fn of(&mut self, user: &str) -> &mut T {
        if !self.users.contains_key(user) {
            self.users.insert(user.to_owned(), T::default());
        }
        self.users.get_mut(user).expect("inserted above")
    }
}

/// The nonces of the exchanges accepted in the last `2 × freshness_ms`.
struct Replay {
    seen: Expiring<[u8; 16], ()>,
    users: UserIndex<UserNonces>,
}

/// One user's nonces, oldest first: (nonce, request time, expiry).
#[derive(Default)]
struct UserNonces {
    order: std::collections::VecDeque<([u8; 16], u64, u64)>,
    /// Requests stamped at or before this were forgotten: `stale`.
    floor_ms: u64,
}

impl UserNonces {
    fn prune(&mut self, now: u64) {
        while self
            .order
            .front()
            .is_some_and(|(_, _, expiry)| *expiry <= now)
        {
            self.order.pop_front();
        }
    }
}

/// Drops the ids at the front of `ids` whose sessions are gone.
fn prune(
    ids: &mut std::collections::VecDeque<[u8; 16]>,
    live: &mut Expiring<[u8; 16], Session>,
    now: u64,
) {
    while let Some(front) = ids.front() {
        if matches!(live.get(front, now), Ok(Some(_))) {
            break;
        }
        ids.pop_front();
    }
}

/// A session lookup's answer as the direct channel's typed errors.
fn live<V>(found: Result<Option<(V, u64)>, ()>) -> Result<(V, u64), ErrorCode> {
    match found {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(ErrorCode::UnknownSession),
        Err(()) => Err(ErrorCode::SessionExpired),
    }
}

pub use crate::clock::now_ms;

const MAX_CERT_CACHE: usize = 100_000;

/// User certificates carry no extended key usage (`pki::Usage::Signing`);
/// one that names some must name document signing, as a T signature is.
const USER_CERT_USAGE: webpki::KeyUsage =
    webpki::KeyUsage::required_if_present(crate::cancel_auth::EKU_DOCUMENT_SIGNING);

impl MarketState {
    pub fn new(cfg: MarketConfig, user_ca_der: &[u8], endpoint: String) -> Result<Self> {
        // Its validity and CA bits are checked with every user
        // certificate (`pki::verify_issued`), at that request's time.
        x509_parser::parse_x509_certificate(user_ca_der)
            .map_err(|e| anyhow::anyhow!("user CA: {e}"))?;
        Ok(Self {
            replay: Mutex::new(Replay {
                seen: Expiring::new(cfg.max_sessions),
                users: UserIndex::default(),
            }),
            sessions: Mutex::new(Expiring::new(cfg.max_sessions)),
            by_user: Mutex::default(),
            cfg,
            signer: None,
            orders: Mutex::new(orders::Orders::in_memory()?),
            endpoint,
            user_ca: user_ca_der.to_vec(),
            certs: Mutex::new(HashMap::new()),
        })
    }

    fn allowed(&self, user: &str) -> bool {
        self.cfg.allowed_users.iter().any(|u| u == "*" || u == user)
    }

    /// Checks a user certificate against the user CA; cached by fingerprint.
    fn user_key(&self, der: &[u8], fp: [u8; 32], now: u64) -> Result<UserKey, ErrorCode> {
        if let Some(k) = self.certs.lock().expect("cert cache").get(&fp)
            && k.not_after_ms > now
        {
            return Ok(k.clone());
        }
        // The one X.509 check (webpki, as for TLS peers and the cancel
        // key): the CA's signature, both certificates' validity at the
        // `now` this check is given (the time every other check of the
        // request uses), no CA certificate as a leaf, and no key usage but
        // document signing if the certificate names one.
        let at =
            rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_millis(now));
        crate::pki::verify_issued(der, &self.user_ca, USER_CERT_USAGE, at).map_err(|e| {
            tracing::debug!(error = %format!("{e:#}"), "user certificate refused");
            ErrorCode::BadSignature
        })?;
        // Its fields, from the certificate webpki has just accepted.
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| ErrorCode::BadSignature)?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .and_then(|c| c.strip_prefix("user "))
            .ok_or(ErrorCode::BadSignature)?;
        let key = UserKey {
            user: cn.to_owned(),
            point: cert.public_key().subject_public_key.data.to_vec(),
            not_after_ms: cert.validity().not_after.timestamp().max(0) as u64 * 1000,
        };
        let mut cache = self.certs.lock().expect("cert cache");
        if cache.len() >= MAX_CERT_CACHE {
            cache.clear();
        }
        cache.insert(fp, key.clone());
        Ok(key)
    }

    /// Verifies one exchange arriving on a market-channel connection whose
    /// exporter value is `binding`, and agrees a session for it.
    pub fn exchange(
        &self,
        req: &ExchangeRequest,
        binding: [u8; 32],
        now: u64,
    ) -> Result<Accepted, ErrorCode> {
        if !self.allowed(&req.user) {
            return Err(ErrorCode::UserNotAllowed);
        }
        if now.abs_diff(req.time_ms) > self.cfg.freshness_ms {
            return Err(ErrorCode::Stale);
        }
        let fp = crate::pki::fingerprint(&req.user_cert);
        let key = self.user_key(&req.user_cert, fp, now)?;
        if key.user != req.user {
            return Err(ErrorCode::BadSignature);
        }
        let t = Transcript {
            mode: req.mode,
            market: self.cfg.id.clone(),
            user: req.user.clone(),
            cert_fingerprint: fp,
            request_id: req.request_id,
            ephemeral: req.ephemeral,
            time_ms: req.time_ms,
            nonce: req.nonce,
            binding,
        };
        let preimage = t.preimage();
        if !exchange::verify_signature(&key.point, &preimage, &req.signature) {
            return Err(ErrorCode::BadSignature);
        }
        self.check_replay(&req.user, req.nonce, req.time_ms, now)?;
        let digest = exchange::sha256(&preimage);
        let eph = Ephemeral::generate(req.ephemeral.group());
        let x = eph
            .x(&req.ephemeral, &digest, &eph.public)
            .ok_or(ErrorCode::BadSignature)?;
        let mut session_id = [0u8; 16];
        rand::fill(&mut session_id);
        let expiry_ms = now + self.cfg.session_ttl_s * 1000;
        self.insert_session(
            session_id,
            Session {
                x,
                user: req.user.clone(),
                connections: 0,
            },
            expiry_ms,
            now,
        )?;
        Ok(Accepted {
            session_id,
            ephemeral: eph.public,
            expiry_ms,
            endpoint: self.endpoint.clone(),
        })
    }

    /// Remembers each nonce for twice the freshness window; a nonce seen
    /// again inside it is a replay. Older ones are refused as stale anyway.
    ///
    /// One user keeps at most `max_sessions_per_user` nonces, so a user
    /// flooding exchanges cannot fill the cache for everyone (it filled
    /// before the sessions did: a nonce stays 60 s, an evicted session's
    /// too). At that quota the user's oldest nonce is forgotten and the
    /// user's floor rises to its time: from then on a request of that user
    /// stamped at or before the floor is `stale`, so the forgotten nonce
    /// cannot be replayed. Only the flooding user's late-arriving requests
    /// can meet the floor; everyone else's window is untouched.
    fn check_replay(
        &self,
        user: &str,
        nonce: [u8; 16],
        time_ms: u64,
        now: u64,
    ) -> Result<(), ErrorCode> {
        let mut r = self.replay.lock().expect("replay cache");
        let Replay { seen, users } = &mut *r;
        let keep = 2 * self.cfg.freshness_ms;
        users.sweep(self.cfg.max_sessions, |u| {
            u.prune(now);
            !u.order.is_empty() || u.floor_ms + keep > now
        });
        let u = users.of(user);
        u.prune(now);
        if time_ms <= u.floor_ms {
            return Err(ErrorCode::Stale);
        }
        if matches!(seen.get(&nonce, now), Ok(Some(_))) {
            return Err(ErrorCode::Replay);
        }
        if u.order.len() >= self.cfg.max_sessions_per_user
            && let Some((old, t, _)) = u.order.pop_front()
        {
            seen.remove(&old);
            u.floor_ms = u.floor_ms.max(t);
        }
        match seen.insert(nonce, (), now + keep, now) {
            Ok(None) => {
                u.order.push_back((nonce, time_ms, now + keep));
                Ok(())
            }
            Ok(Some(())) => Err(ErrorCode::Replay),
            Err(expiring::Full) => Err(ErrorCode::Busy),
        }
    }

    /// Adds a session, within its user's quota (`max_sessions_per_user`):
    /// at the quota the user's oldest session that no direct connection
    /// has used makes room; if every one is in use, `busy`. Unused ones go
    /// first because they are what a flood of exchanges leaves behind, and
    /// a terminal that has connected is using its session.
    fn insert_session(
        &self,
        id: [u8; 16],
        s: Session,
        expiry: u64,
        now: u64,
    ) -> Result<(), ErrorCode> {
        let mut sessions = self.sessions.lock().expect("sessions");
        let mut index = self.by_user.lock().expect("sessions by user");
        index.sweep(self.cfg.max_sessions, |ids| {
            prune(ids, &mut sessions, now);
            !ids.is_empty()
        });
        let ids = index.of(&s.user);
        // Oldest first, so the expired (and the evicted) are at the front.
        prune(ids, &mut sessions, now);
        if ids.len() >= self.cfg.max_sessions_per_user {
            let unused = ids.iter().position(
                |old| matches!(sessions.get(old, now), Ok(Some((s, _))) if s.connections == 0),
            );
            let Some(i) = unused else {
                return Err(ErrorCode::Busy);
            };
            if let Some(old) = ids.remove(i) {
                sessions.remove(&old);
            }
        }
        match sessions.insert(id, s, expiry, now) {
            Ok(_) => {
                ids.push_back(id);
                Ok(())
            }
            Err(expiring::Full) => Err(ErrorCode::Busy),
        }
    }

    /// X and user of a live session; typed errors for unknown or expired.
    pub fn session(
        &self,
        id: &[u8; 16],
        now: u64,
    ) -> Result<(Zeroizing<[u8; 32]>, String, u64), ErrorCode> {
        let mut sessions = self.sessions.lock().expect("sessions");
        let (s, expiry) = live(sessions.get(id, now))?;
        Ok((s.x.clone(), s.user.clone(), expiry))
    }

    /// Counts a direct connection whose handshake completed; refused once
    /// the session has opened `max_connections_per_session`.
    pub fn count_connection(&self, id: &[u8; 16], now: u64) -> Result<(), ErrorCode> {
        let mut sessions = self.sessions.lock().expect("sessions");
        let (s, _) = live(sessions.get_mut(id, now))?;
        if s.connections >= self.cfg.max_connections_per_session {
            return Err(ErrorCode::TooManyConnections);
        }
        s.connections += 1;
        Ok(())
    }

    /// Keeps the order book in `orders` instead of in memory.
    pub fn with_orders(mut self, orders: orders::Orders) -> Self {
        self.orders = Mutex::new(orders);
        self
    }

    /// Gives the market its cancel-signing key (PKCS#8 DER) and certificate
    /// (DER).
    pub fn with_signer(mut self, pkcs8: &[u8], cert_der: Vec<u8>) -> Result<Self> {
        let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8,
        )
        .map_err(|e| anyhow::anyhow!("market key: {e}"))?;
        self.signer = Some((key, cert_der));
        Ok(self)
    }

    /// Checks a purchase receipt a terminal presents: for this market, for
    /// the session's user, recent, signed by that user's certified
    /// home-card key; then records it, once per decision id.
    pub fn verify_receipt(
        &self,
        bytes: &[u8],
        session_user: &str,
        now: u64,
    ) -> Result<String, &'static str> {
        let r = crate::receipt::SignedReceipt::decode(bytes).map_err(|_| "malformed")?;
        let receipt = &r.receipt;
        if receipt.market != self.cfg.id {
            return Err("for another market");
        }
        if receipt.user != session_user {
            return Err("for another user");
        }
        let created = u64::try_from(receipt.created_ms).unwrap_or(0);
        if created > now + self.cfg.freshness_ms
            || now.saturating_sub(created) > self.cfg.receipt_max_age_s * 1000
        {
            return Err("expired");
        }
        let fp = crate::pki::fingerprint(&r.user_cert);
        let key = self
            .user_key(&r.user_cert, fp, now)
            .map_err(|_| "bad certificate")?;
        if key.user != session_user || !r.verify(&key.point) {
            return Err("bad signature");
        }
        let order = orders::NewOrder {
            decision_id: &receipt.decision_id,
            user: &receipt.user,
            amount_minor: receipt.amount_minor,
            currency: std::str::from_utf8(&receipt.currency).unwrap_or("???"),
            order_ref: &receipt.order_ref,
            created_ms: receipt.created_ms,
        };
        let deliver_at = now + self.cfg.delivery_delay_s * 1000;
        self.orders
            .lock()
            .expect("orders")
            .accept(&order, now, deliver_at)?;
        Ok(receipt.decision_id.clone())
    }

    /// The market's authorisation to cancel `decision_id` of `user`, if it
    /// accepted that decision's receipt and has not delivered it: the
    /// encoded [`crate::cancel_auth::SignedCancel`].
    pub fn authorise_cancel(
        &self,
        decision_id: &str,
        user: &str,
        now: u64,
    ) -> Result<Vec<u8>, &'static str> {
        let (key, cert) = self.signer.as_ref().ok_or("no cancel-signing key")?;
        let mut nonce = [0u8; 16];
        rand::fill(&mut nonce);
        let auth = crate::cancel_auth::CancelAuth {
            decision_id: decision_id.to_owned(),
            market: self.cfg.id.clone(),
            user: user.to_owned(),
            nonce,
            expiry_ms: now + self.cfg.cancel_auth_ttl_s * 1000,
        };
        self.orders.lock().expect("orders").cancel(
            decision_id,
            user,
            now,
            &nonce,
            auth.expiry_ms,
        )?;
        let sig = key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), &auth.body())
            .map_err(|_| "signing failed")?;
        Ok(crate::cancel_auth::SignedCancel {
            auth,
            signature: sig.as_ref().to_vec(),
            cert: cert.clone(),
        }
        .encode())
    }

    /// The number of live sessions (for tests and metrics).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("sessions").len()
    }
}
