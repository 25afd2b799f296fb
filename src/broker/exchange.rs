//! One brokered exchange on a core: the shell that carries out what the
//! sans-IO [`crate::exchange::flow::Flow`] asks (the link's binding, HSM
//! jobs, the submit on the link) and records the metrics.
//!
//! ```text
//! kx=software: aws-lc-rs ephemeral ─► HSM: sign T ─► market ─► aws-lc-rs ECDH+HMAC ─► wrap
//! kx=hsm:      HSM: ephemeral + sign T (one job) ─► market ─► HSM: ECDH1_DERIVE + SHA256_HMAC ─► wrap
//! partial:     terminal's ephemeral ─► HSM: sign T ─► market ─► the terminal derives X itself
//! ```

use super::conn::Core;
use super::link::{Failure, Pending};
use super::{HsmWorker, Shared};
use crate::config::Kx;
use crate::exchange::flow::{Action, Flow, Fresh, Params};
use crate::exchange::keyops::KeyOps;
use crate::exchange::{Ephemeral, Group, Point};
use crate::hsm::{HsmError, SessionKey};
use crate::pool::PoolError;
use crate::proto::ErrorCode;
use crate::proto::access::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A released session: the user's key (shared with the user's other
/// released sessions) and what the wallet needs.
pub struct Released {
    pub key: Arc<super::released::UserKey>,
    /// The user's certificate and its SHA-256.
    pub cert: Arc<Vec<u8>>,
    pub fingerprint: [u8; 32],
    /// The terminal certificate's SHA-256 (for password re-checks).
    pub terminal: [u8; 32],
    /// Where the user's notifications go.
    pub mail: String,
}

/// Destroys a session key, unless the HSM lost it already (its handle may
/// name something else now). With the HSM queue full it is owed
/// ([`Owed`]), and the next HSM job destroys it first.
pub(super) fn destroy_later(shared: &Shared, key: SessionKey) {
    let queued = shared.hsm_pool.submit(move |w| destroy_now(w, key));
    if queued.is_err() && !shared.owed.push(key) {
        tracing::warn!(
            "HSM queue full and too many destroys owed: a session object stays until its worker session closes"
        );
    }
}

fn destroy_now(w: &HsmWorker, key: SessionKey) {
    let Ok(h) = w.hsm.live(key) else { return };
    if let Err(e) = crate::hsm::ops::destroy(&w.session, h) {
        tracing::warn!(error = %e, "destroying an HSM session object failed");
    }
}

/// Session objects whose destroy found the HSM queue full. Released keys
/// and unused ephemerals are destroyed after the fact, so an overload that
/// fills the queue must not leave them in the token: the next HSM job of
/// any core destroys them before its own work.
#[derive(Default)]
pub struct Owed {
    /// The length of `keys`: one relaxed load on every HSM job while
    /// nothing is owed.
    count: AtomicUsize,
    keys: Mutex<Vec<SessionKey>>,
}

/// Destroys owed at most; past it one is left to its worker session's end.
const MAX_OWED: usize = 65_536;

impl Owed {
    fn push(&self, key: SessionKey) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= MAX_OWED {
            return false;
        }
        keys.push(key);
        self.count.store(keys.len(), Ordering::Relaxed);
        crate::metrics::hsm_destroys_owed(keys.len());
        true
    }

    fn settle(&self, w: &HsmWorker) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let keys = {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            self.count.store(0, Ordering::Relaxed);
            crate::metrics::hsm_destroys_owed(0);
            std::mem::take(&mut *keys)
        };
        for key in keys {
            destroy_now(w, key);
        }
    }
}

pub fn pool_code(e: PoolError) -> ErrorCode {
    match e {
        PoolError::Busy => ErrorCode::Busy,
        PoolError::Gone => ErrorCode::Internal,
    }
}

fn hsm_code(e: HsmError) -> ErrorCode {
    if let HsmError::Stale = e {
        return ErrorCode::NotReleased;
    }
    tracing::error!(error = %e, "HSM operation failed");
    ErrorCode::HsmUnavailable
}

/// Runs `f` on an HSM worker (the pool, or this core's own session with
/// `hsm.dispatch = "inline"`), timing the operation apart from the queue wait.
/// If the worker's session turns out lost, `f` runs once more on a fresh one.
pub async fn hsm<R: Send + 'static>(
    core: &Core,
    op: &'static str,
    f: impl Fn(&HsmWorker) -> Result<R, HsmError> + Send + 'static,
) -> Result<R, ErrorCode> {
    hsm_ran(core, op, f).await?
}

/// As [`hsm`], telling a job refused before it ran (the outer error) from
/// one that ran and failed.
async fn hsm_ran<R: Send + 'static>(
    core: &Core,
    op: &'static str,
    f: impl Fn(&HsmWorker) -> Result<R, HsmError> + Send + 'static,
) -> Result<Result<R, ErrorCode>, ErrorCode> {
    if let Some(w) = &core.hsm_inline {
        let mut w = w.borrow_mut();
        core.shared.owed.settle(&w);
        return Ok(timed(&mut w, op, f).map_err(hsm_code));
    }
    let owed = core.shared.owed.clone();
    core.shared
        .hsm_pool
        .run(move |w| {
            owed.settle(w);
            timed(w, op, f)
        })
        .await
        .map(|r| r.map_err(hsm_code))
        .map_err(pool_code)
}

fn timed<R>(
    w: &mut HsmWorker,
    op: &'static str,
    f: impl Fn(&HsmWorker) -> Result<R, HsmError>,
) -> Result<R, HsmError> {
    let attempt = |w: &HsmWorker| {
        let started = Instant::now();
        let r = f(w);
        crate::metrics::hsm_op(op, started.elapsed(), r.is_ok());
        r
    };
    match attempt(w) {
        Err(e) if e.session_lost() && recover(w, &e) => attempt(w),
        r => r,
    }
}

/// Gives the worker a fresh session after `e` showed its session lost.
/// Session objects of the old epoch stay lost: a key released before
/// answers [`HsmError::Stale`] on the retry.
fn recover(w: &mut HsmWorker, e: &HsmError) -> bool {
    // Token key handles may change with the sessions (SoftHSM drops them
    // when a slot's last session closes), so they are looked up again.
    match w
        .hsm
        .recover(w.epoch)
        .and_then(|(s, epoch)| Ok((s, epoch, w.hsm.key_handles()?)))
    {
        Ok((s, epoch, keys)) => {
            w.session = s;
            w.epoch = epoch;
            w.keys = keys;
            tracing::warn!(error = %e, "HSM session lost; reopened");
            true
        }
        Err(again) => {
            tracing::error!(error = %again, "HSM still unavailable");
            false
        }
    }
}

pub async fn exchange(
    core: &Core,
    rel: &Released,
    user: &str,
    market: &str,
    terminal_eph: Option<Point>,
    wrap_key: &[u8; 32],
) -> Result<Message, ErrorCode> {
    let started = Instant::now();
    let link = core.link(market)?;
    let kx = core.shared.cfg().exchange.kx;
    let key = rel.key.key;
    let mut flow = Flow::new(Params {
        user: user.to_owned(),
        market: market.to_owned(),
        cert: rel.cert.clone(),
        fingerprint: rel.fingerprint,
        kx,
        terminal_eph,
        wrap_key: zeroize::Zeroizing::new(*wrap_key),
    });
    // The flow decides; this loop only carries its actions out.
    while let Some(action) = flow.poll_action() {
        match action {
            Action::Binding { after } => {
                let b = match after {
                    None => link.binding_when_up().await,
                    Some(old) => {
                        crate::metrics::exchange_retried(market);
                        link.binding_after(old).await
                    }
                };
                flow.handle_binding(b.map(|b| (b, fresh(core, kx, terminal_eph.is_none()))));
            }
            Action::Key(job) => {
                match hsm_ran(core, job.op(), move |w| job.clone().run(w, key)).await {
                    Ok(done) => flow.handle_key(done),
                    Err(code) => flow.handle_key_refused(code),
                }
            }
            Action::Submit { req, binding } => {
                let (tx, rx) = futures_channel::oneshot::channel();
                let r = match link.submit(Pending {
                    req,
                    binding,
                    reply: tx,
                }) {
                    Ok(()) => rx.await.unwrap_or(Err(Failure::Broken)),
                    Err(why) => Err(why),
                };
                flow.handle_reply(r)
            }
            Action::Destroy(private) => destroy_later(&core.shared, private),
            Action::Done(r, kx) => {
                if r.is_ok() {
                    crate::metrics::exchange_done(kx, started.elapsed());
                }
                return r;
            }
        }
    }
    // The flow always ends with Done; an empty queue before it is a bug.
    Err(ErrorCode::Internal)
}

/// An attempt's unique and random values.
fn fresh(core: &Core, kx: Kx, full: bool) -> Fresh {
    let mut nonce = [0u8; 16];
    rand::fill(&mut nonce);
    Fresh {
        request_id: core.request_id(),
        nonce,
        time_ms: crate::clock::now_ms(),
        software: (full && kx == Kx::Software).then(|| Ephemeral::generate(Group::X25519)),
    }
}

/// The home card behind [`KeyOps`]: one HSM worker's session. The user's
/// key is a released session object and an ephemeral one made here, both
/// valid only in the epoch they were made in ([`HsmError::Stale`] after).
impl KeyOps for HsmWorker {
    type Key = SessionKey;
    type Private = SessionKey;
    type Error = HsmError;

    fn sign_digest(&self, key: SessionKey, digest: &[u8; 32]) -> Result<Vec<u8>, HsmError> {
        crate::hsm::ops::sign_digest_p256(&self.session, self.hsm.live(key)?, digest)
    }

    fn generate_ephemeral(&self) -> Result<(Point, SessionKey), HsmError> {
        let (point, private) = crate::hsm::ops::generate_ephemeral(&self.session)?;
        match Point::new(Group::P256, &point) {
            Some(p) => Ok((p, self.session_key(private))),
            None => {
                let _ = crate::hsm::ops::destroy(&self.session, private);
                Err(HsmError::Format("a bad EC point"))
            }
        }
    }

    fn derive_x(
        &self,
        private: SessionKey,
        peer: &Point,
        input: &[u8],
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, HsmError> {
        let private = self.hsm.live(private)?;
        let x = crate::hsm::ops::derive_x(&self.session, private, peer.as_bytes(), input)?;
        <[u8; 32]>::try_from(x.as_slice())
            .map(zeroize::Zeroizing::new)
            .map_err(|_| HsmError::Format("an HMAC that is not 32 bytes"))
    }

    fn destroy(&self, private: SessionKey) {
        if let Ok(h) = self.hsm.live(private) {
            let _ = crate::hsm::ops::destroy(&self.session, h);
        }
    }
}
