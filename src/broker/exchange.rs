//! One brokered exchange on a core: sign in the HSM, batch to the market,
//! derive X, wrap it under X'wrap.
//!
//! ```text
//! kx=software: aws-lc-rs ephemeral ─► HSM: sign T ─► market ─► aws-lc-rs ECDH+HMAC ─► wrap
//! kx=hsm:      HSM: ephemeral + sign T (one job) ─► market ─► HSM: ECDH1_DERIVE + SHA256_HMAC ─► wrap
//! partial:     terminal's ephemeral ─► HSM: sign T ─► market ─► the terminal derives X itself
//! ```

use super::conn::Core;
use super::link::{Failure, Link, Pending};
use super::{HsmWorker, Shared};
use crate::config::Kx;
use crate::exchange::{self, Ephemeral, Group, Mode, Point, Transcript};
use crate::hsm::{HsmError, SessionKey};
use crate::pool::PoolError;
use crate::proto::ErrorCode;
use crate::proto::access::Message;
use crate::proto::market::{Accepted, ExchangeRequest};
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

/// The requester's ephemeral key.
enum Eph {
    Software(Ephemeral),
    Hsm(SessionKey),
    Terminal,
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
    let shared = &core.shared;
    let link = core.link(market)?;
    let binding = link
        .binding_when_up()
        .await
        .ok_or(ErrorCode::MarketUnavailable)?;
    let req = Ask {
        core,
        rel,
        user,
        market,
        terminal_eph,
        link: &link,
    };
    let asked = match req.ask(binding).await {
        // Nothing is done until X is wrapped, and the market holds nothing
        // but an unused session it will expire: a request whose channel
        // broke under it is asked once more, signed for the next channel.
        Err(Failure::Broken) => {
            crate::metrics::exchange_retried(market);
            let next = link
                .binding_after(binding)
                .await
                .ok_or(ErrorCode::MarketUnavailable)?;
            req.ask(next).await
        }
        r => r,
    };
    let Asked {
        accepted,
        eph,
        digest,
    } = asked.map_err(Failure::code)?;
    // The mode the attempt ran in, not the config read again: a reload
    // between the two would mislabel the exchange.
    let (kx, x) = match eph {
        Eph::Terminal => {
            crate::metrics::exchange_done("partial", started.elapsed());
            return Ok(Message::PartialOk {
                session_id: accepted.session_id,
                expiry_ms: accepted.expiry_ms,
                endpoint: accepted.endpoint,
                market_ephemeral: accepted.ephemeral,
                transcript: digest,
            });
        }
        Eph::Software(e) => (
            "software",
            e.x(&accepted.ephemeral, &digest, &accepted.ephemeral)
                .ok_or(ErrorCode::MarketInternal)?,
        ),
        Eph::Hsm(private) => {
            let peer = accepted.ephemeral;
            if peer.group() != Group::P256 {
                destroy_later(shared, private);
                return Err(ErrorCode::MarketInternal);
            }
            let input = exchange::x_input(&digest, &peer);
            let x = hsm(core, "derive", move |w| {
                let private = w.hsm.live(private)?;
                crate::hsm::ops::derive_x(&w.session, private, peer.as_bytes(), &input)
            })
            .await?;
            (
                "hsm",
                zeroize::Zeroizing::new(
                    <[u8; 32]>::try_from(x.as_slice()).map_err(|_| ErrorCode::HsmUnavailable)?,
                ),
            )
        }
    };
    let wrapped_x = exchange::wrap(wrap_key, &x);
    crate::metrics::exchange_done(kx, started.elapsed());
    Ok(Message::ExchangeOk {
        session_id: accepted.session_id,
        expiry_ms: accepted.expiry_ms,
        endpoint: accepted.endpoint,
        wrapped_x,
    })
}

/// What one attempt needs; [`Ask::ask`] can run twice.
struct Ask<'a> {
    core: &'a Core,
    rel: &'a Released,
    user: &'a str,
    market: &'a str,
    terminal_eph: Option<Point>,
    link: &'a Link,
}

/// The market's acceptance, with what X is derived from on this side.
struct Asked {
    accepted: Accepted,
    eph: Eph,
    digest: [u8; 32],
}

impl Ask<'_> {
    /// Signs T for the channel `binding` names and asks the market.
    async fn ask(&self, binding: [u8; 32]) -> Result<Asked, Failure> {
        let core = self.core;
        let mut nonce = [0u8; 16];
        rand::fill(&mut nonce);
        let mut t = Transcript {
            mode: if self.terminal_eph.is_some() {
                Mode::Partial
            } else {
                Mode::Full
            },
            market: self.market.to_owned(),
            user: self.user.to_owned(),
            cert_fingerprint: self.rel.fingerprint,
            request_id: core.request_id(),
            ephemeral: Point::UNSET,
            time_ms: crate::clock::now_ms(),
            nonce,
            binding,
        };
        let key = self.rel.key.key;
        let (eph, digest, signature) = match (self.terminal_eph, core.shared.cfg().exchange.kx) {
            (Some(p), _) => {
                t.ephemeral = p;
                let (d, sig) = sign(core, key, &t).await?;
                (Eph::Terminal, d, sig)
            }
            (None, Kx::Software) => {
                let e = Ephemeral::generate(Group::X25519);
                t.ephemeral = e.public;
                let (d, sig) = sign(core, key, &t).await?;
                (Eph::Software(e), d, sig)
            }
            (None, Kx::Hsm) => {
                let (point, private, digest, sig) = keygen_sign(core, key, &t).await?;
                t.ephemeral = point;
                (Eph::Hsm(private), digest, sig)
            }
        };
        let (tx, rx) = futures_channel::oneshot::channel();
        let pending = Pending {
            req: ExchangeRequest {
                request_id: t.request_id,
                mode: t.mode,
                user: t.user,
                user_cert: self.rel.cert.to_vec(),
                ephemeral: t.ephemeral,
                time_ms: t.time_ms,
                nonce: t.nonce,
                signature,
            },
            binding,
            reply: tx,
        };
        let answer = match self.link.submit(pending) {
            Ok(()) => rx.await.unwrap_or(Err(Failure::Broken)),
            Err(why) => Err(why),
        };
        match answer {
            Ok(accepted) => Ok(Asked {
                accepted,
                eph,
                digest,
            }),
            Err(why) => {
                if let Eph::Hsm(h) = eph {
                    destroy_later(&core.shared, h);
                }
                Err(why)
            }
        }
    }
}

/// kx=hsm: a fresh HSM ephemeral and the home-card key's signature over T
/// with it, in one job.
async fn keygen_sign(
    core: &Core,
    key: SessionKey,
    t: &Transcript,
) -> Result<(Point, SessionKey, [u8; 32], Vec<u8>), ErrorCode> {
    let tt = t.clone();
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

/// T and the home-card key's signature over it.
async fn sign(
    core: &Core,
    key: SessionKey,
    t: &Transcript,
) -> Result<([u8; 32], Vec<u8>), ErrorCode> {
    let digest = t.digest();
    let sig = hsm(core, "sign", move |w| {
        crate::hsm::ops::sign_digest_p256(&w.session, w.hsm.live(key)?, &digest)
    })
    .await?;
    Ok((digest, sig))
}
