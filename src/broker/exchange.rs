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
use crate::exchange::flow::{Action, Flow, Fresh, KeyJob, Params};
use crate::exchange::{Ephemeral, Group, Point, Transcript};
use crate::hsm::{HsmError, SessionKey};
use crate::pool::PoolError;
use crate::proto::ErrorCode;
use crate::proto::access::Message;
use std::sync::Arc;
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
/// name something else now).
pub(super) fn destroy_later(shared: &Shared, key: SessionKey) {
    let queued = shared.hsm_pool.submit(move |w| {
        let Ok(h) = w.hsm.live(key) else { return };
        if let Err(e) = crate::hsm::ops::destroy(&w.session, h) {
            tracing::warn!(error = %e, "destroying an HSM session object failed");
        }
    });
    if queued.is_err() {
        tracing::warn!("HSM queue full: a session object stays until its worker session closes");
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
    if let Some(w) = &core.hsm_inline {
        return timed(&mut w.borrow_mut(), op, f).map_err(hsm_code);
    }
    core.shared
        .hsm_pool
        .run(move |w| timed(w, op, f))
        .await
        .map_err(pool_code)?
        .map_err(hsm_code)
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
            Action::Key(KeyJob::Sign { digest }) => flow.handle_signed(
                hsm(core, "sign", move |w| {
                    crate::hsm::ops::sign_digest_p256(&w.session, w.hsm.live(key)?, &digest)
                })
                .await,
            ),
            Action::Key(KeyJob::KeygenSign { transcript }) => {
                flow.handle_keygen_signed(keygen_sign(core, key, transcript).await)
            }
            Action::Key(KeyJob::Derive {
                private,
                peer,
                input,
            }) => {
                let x = hsm(core, "derive", move |w| {
                    let private = w.hsm.live(private)?;
                    crate::hsm::ops::derive_x(&w.session, private, peer.as_bytes(), &input)
                })
                .await
                .and_then(|x| {
                    <[u8; 32]>::try_from(x.as_slice())
                        .map(zeroize::Zeroizing::new)
                        .map_err(|_| ErrorCode::HsmUnavailable)
                });
                flow.handle_derived(x)
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

/// kx=hsm: a fresh HSM ephemeral and the home-card key's signature over T
/// with it, in one job.
async fn keygen_sign(
    core: &Core,
    key: SessionKey,
    tt: Transcript,
) -> Result<(Point, SessionKey, [u8; 32], Vec<u8>), ErrorCode> {
    hsm(core, "keygen_sign", move |w| {
        let (point, private) = crate::hsm::ops::generate_ephemeral(&w.session)?;
        let mut tt = tt.clone();
        tt.ephemeral = Point::new(Group::P256, &point).ok_or(HsmError::Format("a bad EC point"))?;
        let digest = tt.digest();
        let signed = w
            .hsm
            .live(key)
            .and_then(|k| crate::hsm::ops::sign_digest_p256(&w.session, k, &digest));
        match signed {
            Ok(sig) => Ok((tt.ephemeral, w.session_key(private), digest, sig)),
            Err(e) => {
                let _ = crate::hsm::ops::destroy(&w.session, private);
                Err(e)
            }
        }
    })
    .await
}
