//! The broker's side of one terminal connection once its TLS handshake is
//! done, as a state machine: plaintext bytes in, answers out, the checks
//! and requests the access session asks for, and the connection's timers.
//!
//! ```text
//! handle_bytes ─► FrameDecoder ─► AccessSession ─► Reply ─► out (held while the burst lasts)
//!                                                └► Work ─► runtime ─► *_done ─► Reply ─► out
//! poll_action(now) ─► Work │ Send │ Read{until} │ Close
//! ```
//!
//! It owns what the connection loop used to decide in async code:
//!
//! - **Pipelining.** Frames that arrive in one burst are handled one by
//!   one (the session takes one at a time), and their answers leave
//!   together in one `Send`, once no complete frame is left.
//! - **Timers.** A connection with nothing buffered may stay silent for
//!   `idle`; a frame that has begun must complete within `frame` of its
//!   first byte, so a peer that trickles bytes (slowloris) cannot hold the
//!   connection by staying just under `idle`. Both answer `timeout` with
//!   id 0 (docs/PROTOCOL.md §1.3) and close.
//! - **Revocation.** A terminal revoked while connected
//!   ([`ConnCore::handle_revoked`]) is cut off before its next frame, with
//!   that frame's id, or at once when it is waiting for one.
//! - **Refusals.** Every error frame queued comes out as an
//!   [`Event::Refused`] for the runtime's audit line and metric; a `busy`
//!   refused over a rate carries its retry hint (docs/PROTOCOL.md §1.6).
//!
//! Nothing here touches a socket, a clock or a pool: time comes in as
//! `now`, and the runtime reports what it did. `tests/sim.rs` drives it
//! with bytes cut at random points.

use super::access::{Frame, FrameDecoder, Message, encode};
use super::code::ErrorCode;
use super::session::{AccessSession, Action as SessionAction, LoginCheck, ReleaseCheck, Request};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A refusal before or from a check, with the hint a `busy` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    /// When the terminal may try again, ms (over its rate).
    pub retry_ms: Option<u64>,
}

impl From<ErrorCode> for Refused {
    fn from(code: ErrorCode) -> Self {
        Self {
            code,
            retry_ms: None,
        }
    }
}

/// How long a connection may wait for bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// With nothing buffered.
    pub idle: Duration,
    /// For a frame to complete, from its first byte.
    pub frame: Duration,
}

/// A check or request the session asked for; its result goes back through
/// the matching `*_done` ([`ConnCore::login_done`], [`ConnCore::release_done`],
/// [`ConnCore::request_done`]) with the proof it carries.
pub use super::session::Work;

/// What the runtime must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Run this, and report its result.
    Work(Work),
    /// Send [`ConnCore::out`] and flush it, then call [`ConnCore::sent`].
    Send,
    /// Read; report bytes, or [`ConnCore::handle_timeout`] at `until`.
    Read { until: Instant },
    /// Send [`ConnCore::out`] (the last answer, if any) and close.
    Close,
    /// A [`Work`] is out: nothing to do until its result.
    Wait,
}

/// What the runtime should know of, for its logs and metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// An error frame was queued for the terminal.
    Refused {
        id: u32,
        code: ErrorCode,
        detail: String,
    },
}

pub struct ConnCore<K> {
    session: AccessSession<K>,
    decoder: FrameDecoder,
    timeouts: Timeouts,
    /// Encoded answers not yet sent.
    out: Vec<u8>,
    /// Work the session asked for, not yet handed out.
    work: Option<Work>,
    /// Work handed out whose result has not come back.
    working: bool,
    /// The last answer is queued: close once it is out.
    closing: bool,
    revoked: bool,
    /// When the first byte of the still-incomplete frame arrived.
    partial_since: Option<Instant>,
    /// The deadline of the read last asked for.
    deadline: Option<Instant>,
    /// The retry hint of the `busy` about to be queued.
    retry_ms: Option<u64>,
    events: VecDeque<Event>,
}

impl<K> ConnCore<K> {
    /// `confirm`: X'confirm, for the session's `LoginOk`.
    pub fn new(confirm: [u8; 32], max_frame: usize, timeouts: Timeouts) -> Self {
        Self {
            session: AccessSession::new(confirm),
            decoder: FrameDecoder::new(max_frame),
            timeouts,
            out: Vec::with_capacity(256),
            work: None,
            working: false,
            closing: false,
            revoked: false,
            partial_since: None,
            deadline: None,
            retry_ms: None,
            events: VecDeque::new(),
        }
    }

    /// The released key, while the session has one.
    pub fn released(&self) -> Option<&K> {
        self.session.released()
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&str> {
        self.session.user()
    }

    pub fn is_released(&self) -> bool {
        self.session.is_released()
    }

    /// Bytes read from the terminal (plaintext).
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.deadline = None;
        self.decoder.push(bytes);
    }

    /// The terminal was revoked (or its user removed).
    pub fn handle_revoked(&mut self) {
        self.revoked = true;
    }

    /// The read's deadline came; ignored if it is not yet due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) && !self.closing {
            self.deadline = None;
            self.end(0, ErrorCode::Timeout, "idle");
        }
    }

    /// Ends the connection before any frame: `code` with id 0.
    pub fn end(&mut self, id: u32, code: ErrorCode, detail: &str) {
        self.queue(&Frame {
            id,
            msg: Message::error(code, detail),
        });
        self.closing = true;
    }

    /// Result of [`Work::CheckLogin`].
    pub fn login_done(&mut self, check: LoginCheck, r: Result<(), Refused>) {
        let r = self.result(r);
        let a = self.session.login_done(check, r);
        self.apply(a);
    }

    /// Result of [`Work::CheckRelease`]: the released key, or why not.
    pub fn release_done(&mut self, check: ReleaseCheck, r: Result<K, Refused>) {
        let r = self.result(r);
        let a = self.session.release_done(check, r);
        self.apply(a);
    }

    /// Result of [`Work::Exchange`] or [`Work::Wallet`].
    pub fn request_done(&mut self, req: Request, r: Result<Message, Refused>) {
        let r = self.result(r);
        let a = self.session.request_done(req, r);
        self.apply(a);
    }

    fn result<T>(&mut self, r: Result<T, Refused>) -> Result<T, ErrorCode> {
        self.working = false;
        r.map_err(|why| {
            self.retry_ms = why.retry_ms;
            why.code
        })
    }

    /// The answers to send, for [`Action::Send`] and [`Action::Close`].
    pub fn out(&self) -> &[u8] {
        &self.out
    }

    /// [`ConnCore::out`] has been handed to the channel.
    pub fn sent(&mut self) {
        self.out.clear();
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_action(&mut self, now: Instant) -> Action {
        loop {
            if self.closing {
                return Action::Close;
            }
            if let Some(w) = self.work.take() {
                self.working = true;
                return Action::Work(w);
            }
            if self.working {
                return Action::Wait;
            }
            if self.revoked {
                let id = match self.decoder.next_frame() {
                    Ok(Some(f)) => f.id,
                    _ => 0,
                };
                self.end(id, ErrorCode::TerminalRevoked, "terminal revoked");
                continue;
            }
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    let a = self.session.handle(frame);
                    self.apply(a);
                }
                Ok(None) => break,
                Err(e) => {
                    self.queue(&e.answer());
                    self.closing = true;
                }
            }
        }
        if !self.out.is_empty() {
            return Action::Send;
        }
        let until = if self.decoder.pending() == 0 {
            self.partial_since = None;
            now + self.timeouts.idle
        } else {
            let since = *self.partial_since.get_or_insert(now);
            (since + self.timeouts.frame).min(now + self.timeouts.idle)
        };
        self.deadline = Some(until);
        Action::Read { until }
    }

    fn apply(&mut self, a: SessionAction) {
        match a {
            SessionAction::Reply(f) => self.queue(&f),
            SessionAction::Close(f) => {
                self.queue(&f);
                self.closing = true;
            }
            SessionAction::Work(w) => {
                debug_assert!(self.work.is_none(), "the session asks one thing at a time");
                self.work = Some(w);
            }
        }
    }

    fn queue(&mut self, frame: &Frame) {
        let retry = self.retry_ms.take();
        let Message::Error { code, detail } = &frame.msg else {
            return encode(frame, &mut self.out);
        };
        let (code, detail) = match (code, retry) {
            // docs/PROTOCOL.md §1.6: a rate's busy says when to come back.
            (ErrorCode::Busy, Some(ms)) => (*code, format!("retry_after_ms={ms}")),
            _ => (*code, detail.clone()),
        };
        let frame = Frame {
            id: frame.id,
            msg: Message::error(code, detail.clone()),
        };
        encode(&frame, &mut self.out);
        self.events.push_back(Event::Refused {
            id: frame.id,
            code,
            detail,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::access::{Password, decode_body};

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(300),
        frame: Duration::from_secs(10),
    };

    fn bytes(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            encode(f, &mut out);
        }
        out
    }

    fn frames(mut b: &[u8]) -> Vec<Frame> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
            v.push(decode_body(&b[4..4 + len]).unwrap());
            b = &b[4 + len..];
        }
        v
    }

    fn ping(id: u32) -> Frame {
        Frame {
            id,
            msg: Message::Ping,
        }
    }

    fn login(id: u32) -> Frame {
        Frame {
            id,
            msg: Message::Login {
                user: "alice".into(),
                password: Password::new(b"pw".to_vec()),
            },
        }
    }

    fn conn() -> ConnCore<&'static str> {
        ConnCore::new([7; 32], 4096, T)
    }

    fn sent(c: &mut ConnCore<&'static str>) -> Vec<Frame> {
        let f = frames(c.out());
        c.sent();
        f
    }

    #[test]
    fn a_burst_is_answered_in_one_send_even_across_a_check() {
        let now = Instant::now();
        let mut c = conn();
        c.handle_bytes(&bytes(&[ping(1), login(2), ping(3)]));
        let Action::Work(Work::CheckLogin { check, .. }) = c.poll_action(now) else {
            panic!("the login is checked")
        };
        assert_eq!(c.poll_action(now), Action::Wait);
        c.login_done(check, Ok(()));
        assert_eq!(c.poll_action(now), Action::Send);
        let ids: Vec<u32> = sent(&mut c).iter().map(|f| f.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(matches!(c.poll_action(now), Action::Read { .. }));
    }

    #[test]
    fn a_frame_cut_anywhere_is_the_same_frame() {
        let now = Instant::now();
        let all = bytes(&[ping(1), ping(2)]);
        for cut in 0..all.len() {
            let mut c = conn();
            c.handle_bytes(&all[..cut]);
            let mut got = Vec::new();
            if c.poll_action(now) == Action::Send {
                got.extend(sent(&mut c));
            }
            c.handle_bytes(&all[cut..]);
            while c.poll_action(now) == Action::Send {
                got.extend(sent(&mut c));
            }
            let ids: Vec<u32> = got.iter().map(|f| f.id).collect();
            assert_eq!(ids, [1, 2], "cut at {cut}");
            assert!(got.iter().all(|f| f.msg == Message::Pong));
            assert!(c.events.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn a_trickled_frame_times_out_at_the_frame_timeout_and_silence_at_idle() {
        let t0 = Instant::now();
        let mut c = conn();
        assert_eq!(c.poll_action(t0), Action::Read { until: t0 + T.idle });
        let b = bytes(&[ping(1)]);
        c.handle_bytes(&b[..3]);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            c.poll_action(later),
            Action::Read {
                until: later + T.frame
            }
        );
        c.handle_bytes(&b[3..4]);
        // One more byte does not move the frame's deadline.
        let Action::Read { until } = c.poll_action(later + Duration::from_secs(9)) else {
            panic!()
        };
        assert_eq!(until, later + T.frame);
        c.handle_timeout(until - Duration::from_millis(1));
        assert!(
            matches!(c.poll_action(until), Action::Read { .. }),
            "not due"
        );
        c.handle_timeout(until);
        assert_eq!(c.poll_action(until), Action::Close);
        let f = sent(&mut c);
        assert_eq!(f[0].id, 0);
        assert!(matches!(
            f[0].msg,
            Message::Error {
                code: ErrorCode::Timeout,
                ..
            }
        ));
    }

    #[test]
    fn a_revoked_terminal_is_cut_before_its_next_frame_with_its_id() {
        let now = Instant::now();
        let mut c = conn();
        c.handle_bytes(&bytes(&[ping(4), ping(5)]));
        c.handle_revoked();
        assert_eq!(c.poll_action(now), Action::Close);
        let f = sent(&mut c);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].id, 4);
        assert_eq!(
            c.poll_event(),
            Some(Event::Refused {
                id: 4,
                code: ErrorCode::TerminalRevoked,
                detail: "terminal revoked".into()
            })
        );
        let mut idle = conn();
        idle.handle_revoked();
        assert_eq!(idle.poll_action(now), Action::Close);
        assert_eq!(sent(&mut idle)[0].id, 0);
    }

    #[test]
    fn a_rate_busy_carries_its_hint_and_a_bad_frame_closes() {
        let now = Instant::now();
        let mut c = conn();
        c.handle_bytes(&bytes(&[login(1)]));
        let Action::Work(Work::CheckLogin { check, .. }) = c.poll_action(now) else {
            panic!()
        };
        c.login_done(
            check,
            Err(Refused {
                code: ErrorCode::Busy,
                retry_ms: Some(250),
            }),
        );
        assert_eq!(c.poll_action(now), Action::Send);
        let f = sent(&mut c);
        assert_eq!(
            f[0].msg,
            Message::error(ErrorCode::Busy, "retry_after_ms=250")
        );
        c.poll_event();
        // A length too short for a header cannot be resynchronised.
        c.handle_bytes(&[0, 0, 0, 1, 9]);
        assert_eq!(c.poll_action(now), Action::Close);
        assert!(matches!(
            c.poll_event(),
            Some(Event::Refused {
                code: ErrorCode::Malformed,
                ..
            })
        ));
    }
}
