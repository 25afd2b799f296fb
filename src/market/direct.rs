//! One direct-channel connection at the market, sans-IO: bytes in, frames
//! out, time passed in, and the two timers (the Hello must come within
//! `hello_timeout_ms` of the connection, an established channel may be
//! silent for `idle_timeout_ms`). `server::serve_direct` only moves the
//! bytes. The answers to the frames of one read leave in one send; a
//! refusal's alert follows them, and the channel ends.
//!
//! ```text
//! AwaitHello ──Hello{sid, noise1}──► session lookup ─► handshake ─► count ─► Live{channel, user, expiry}
//!     │                                 (unknown_session / session_expired / bad_handshake / too_many_connections)
//! Live ──Record──► expiry check ─► open ─► answer ─► Record
//! anything else, or a second Hello ──► unexpected
//! ```

use super::MarketState;
use crate::proto::ErrorCode;
use crate::proto::direct::{self, Channel, Decoder, Hello};
use std::time::{Duration, Instant};

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

/// What the shell does next.
#[derive(Debug)]
pub enum Action {
    /// Send what [`DirectConn::take_out`] gives.
    Send,
    /// Read; report bytes, or [`DirectConn::handle_timeout`] at `until`.
    Read { until: Instant },
    /// Send what [`DirectConn::take_out`] gives (with the alert, if
    /// refused) and close;
    /// `refused` is the audit line's.
    Close { refused: Option<Refusal> },
}

pub struct DirectConn {
    live: Option<Live>,
    dec: Decoder,
    out: Vec<u8>,
    hello_by: Instant,
    idle: Duration,
    deadline: Option<Instant>,
    closing: Option<Option<Refusal>>,
}

impl DirectConn {
    /// A connection accepted at `now`.
    pub fn new(now: Instant, hello_timeout: Duration, idle: Duration) -> Self {
        Self {
            live: None,
            dec: Decoder::default(),
            out: Vec::with_capacity(1024),
            hello_by: now + hello_timeout,
            idle,
            deadline: None,
            closing: None,
        }
    }

    /// Whether the handshake has completed.
    pub fn established(&self) -> bool {
        self.live.is_some()
    }

    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.deadline = None;
        self.dec.push(bytes);
    }

    /// The read's deadline came: before the Hello, a `timeout` alert; after
    /// it, the idle channel just ends. Ignored if not yet due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_none_or(|d| now < d) || self.closing.is_some() {
            return;
        }
        self.closing = Some(if self.established() {
            None
        } else {
            Some(self.alert(ErrorCode::Timeout.into()))
        });
    }

    /// Takes the bytes to send, leaving `spare` (emptied) in their place:
    /// the write owns its buffer, and no byte is copied.
    pub fn take_out(&mut self, mut spare: Vec<u8>) -> Vec<u8> {
        spare.clear();
        std::mem::replace(&mut self.out, spare)
    }

    pub fn poll_action(&mut self, state: &MarketState, now: Instant, now_ms: u64) -> Action {
        while self.closing.is_none() {
            let (ty, payload) = match self.dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let r = self.alert(e.code().into());
                    self.closing = Some(Some(r));
                    break;
                }
            };
            let mut out = std::mem::take(&mut self.out);
            let r = self.handle(state, ty, &payload, now_ms, &mut out);
            self.out = out;
            if let Err(why) = r {
                let why = self.alert(why);
                self.closing = Some(Some(why));
            }
        }
        if let Some(refused) = self.closing.take() {
            // Closed stays closed.
            self.closing = Some(None);
            return Action::Close { refused };
        }
        if !self.out.is_empty() {
            return Action::Send;
        }
        let until = if self.established() {
            now + self.idle
        } else {
            self.hello_by
        };
        self.deadline = Some(until);
        Action::Read { until }
    }

    /// Appends the refusal's alert to what is held.
    fn alert(&mut self, why: Refusal) -> Refusal {
        direct::frame(
            direct::ALERT,
            &(why.code as u16).to_be_bytes(),
            &mut self.out,
        );
        why
    }

    /// Handles one frame, appending any answer to `out`. On `Err` the
    /// caller sends the alert after `out` and closes.
    fn handle(
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
