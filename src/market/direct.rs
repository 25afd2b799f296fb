//! One direct-channel connection at the market, sans-IO: frames in, frames
//! out, time passed in. `server::serve_direct` only moves the bytes.
//!
//! ```text
//! AwaitHello ──Hello{sid, noise1}──► session lookup ─► handshake ─► count ─► Live{channel, user, expiry}
//!     │                                 (unknown_session / session_expired / bad_handshake / too_many_connections)
//! Live ──Record──► expiry check ─► open ─► answer ─► Record
//! anything else, or a second Hello ──► unexpected
//! ```

use super::MarketState;
use crate::proto::ErrorCode;
use crate::proto::direct::{self, Channel, Hello};

struct Live {
    channel: Channel,
    user: String,
    expiry_ms: u64,
    session: [u8; 16],
}

/// Why a connection was refused, for the alert and the audit line.
#[derive(Debug)]
pub struct Refusal {
    pub code: ErrorCode,
    /// The session's user, once known.
    pub user: Option<String>,
    /// The session the Hello named, once parsed: which exchange the
    /// refused connection claimed to come from.
    pub session: Option<[u8; 16]>,
}

impl Refusal {
    fn of(code: ErrorCode, user: &str, session: [u8; 16]) -> Self {
        Self {
            code,
            user: Some(user.to_owned()),
            session: Some(session),
        }
    }
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Self {
        Self {
            code,
            user: None,
            session: None,
        }
    }
}

#[derive(Default)]
pub struct DirectConn {
    live: Option<Live>,
}

impl DirectConn {
    /// Whether the handshake has completed.
    pub fn established(&self) -> bool {
        self.live.is_some()
    }

    /// Handles one frame, appending any answer to `out`. On `Err` the
    /// caller sends the alert after `out` and closes.
    pub fn handle(
        &mut self,
        state: &MarketState,
        ty: u8,
        payload: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        match (ty, &mut self.live) {
            (direct::HELLO, None) => {
                let live = hello(state, payload, now_ms, out)?;
                self.live = Some(live);
                Ok(())
            }
            (direct::RECORD, Some(live)) => {
                let refuse = |code| Refusal::of(code, &live.user, live.session);
                if now_ms >= live.expiry_ms {
                    return Err(refuse(ErrorCode::SessionExpired));
                }
                let request = live.channel.open(payload).map_err(|e| refuse(e.code()))?;
                let answer = super::server::answer(state, &live.user, &request, now_ms);
                live.channel.seal(&answer, out);
                Ok(())
            }
            (_, live) => Err(Refusal {
                code: ErrorCode::Unexpected,
                user: live.as_ref().map(|l| l.user.clone()),
                session: live.as_ref().map(|l| l.session),
            }),
        }
    }
}

fn hello(
    state: &MarketState,
    payload: &[u8],
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<Live, Refusal> {
    let hello = Hello::parse(payload).map_err(|e| Refusal::from(e.code()))?;
    let session = hello.session_id;
    let (x, user, expiry_ms) = state.session(&session, now_ms).map_err(|code| Refusal {
        session: Some(session),
        ..Refusal::from(code)
    })?;
    let refuse = |code| Refusal::of(code, &user, session);
    let mark = out.len();
    let channel = hello.accept(&x, out).map_err(|e| refuse(e.code()))?;
    // Counted only once the handshake proved X, so junk Hellos cannot use
    // up a session's connections; a replayed genuine Hello can, up to the cap.
    if let Err(code) = state.count_connection(&hello.session_id, now_ms) {
        out.truncate(mark);
        return Err(refuse(code));
    }
    Ok(Live {
        channel,
        user,
        expiry_ms,
        session,
    })
}
