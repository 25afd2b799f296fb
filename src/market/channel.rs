//! The market's side of one market channel, after its TLS handshake, as a
//! state machine: the broker's bytes in, the replies out, the idle timer.
//!
//! ```text
//! handle_bytes ─► Splitter ─► Ping ─► Pong
//!                           └► batch ─► Exchanges::exchange (each request) ─► one reply frame
//! poll_action(now, now_ms) ─► Send │ Read{until} │ Close
//! ```
//!
//! The decisions (is T signed by the user's certified key, is the nonce
//! fresh, is the binding this channel's) are [`Exchanges::exchange`]'s,
//! `MarketState` in the market and a simulated market in tests/sim.rs; the
//! core owns the framing, the keepalive and the idle timeout. The replies
//! to every batch that arrived together leave in one send, each batch's
//! in its own frame, in the order of its requests. A frame that does not
//! parse ends the channel: the broker's link redials and asks again.

use crate::proto::ErrorCode;
use crate::proto::market::{self, Accepted, ExchangeReply, ExchangeRequest, Splitter};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the market decides for one exchange request on a channel whose
/// TLS exporter gave `binding`.
pub trait Exchanges {
    fn exchange(
        &self,
        req: &ExchangeRequest,
        binding: [u8; 32],
        now_ms: u64,
    ) -> Result<Accepted, ErrorCode>;
}

impl Exchanges for super::MarketState {
    fn exchange(
        &self,
        req: &ExchangeRequest,
        binding: [u8; 32],
        now_ms: u64,
    ) -> Result<Accepted, ErrorCode> {
        super::MarketState::exchange(self, req, binding, now_ms)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send [`ChannelCore::out`], then call [`ChannelCore::sent`].
    Send,
    /// Read; report bytes, or [`ChannelCore::handle_timeout`] at `until`.
    Read { until: Instant },
    /// Close the channel (after sending what `out` holds).
    Close,
}

/// What the shell logs.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Accepted {
        user: String,
        request_id: u64,
    },
    Refused {
        user: String,
        request_id: u64,
        code: ErrorCode,
    },
    /// A frame that is not a batch: the channel closes.
    Malformed,
}

pub struct ChannelCore {
    binding: [u8; 32],
    idle: Duration,
    split: Splitter,
    out: Vec<u8>,
    deadline: Option<Instant>,
    closing: bool,
    events: VecDeque<Event>,
}

impl ChannelCore {
    /// `binding`: the channel's TLS exporter value (`BINDING_LABEL`), which
    /// the broker's T carries; `idle`: how long a silent channel stays.
    pub fn new(binding: [u8; 32], idle: Duration) -> Self {
        Self {
            binding,
            idle,
            split: Splitter::default(),
            out: Vec::with_capacity(4096),
            deadline: None,
            closing: false,
            events: VecDeque::new(),
        }
    }

    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.deadline = None;
        self.split.push(bytes);
    }

    /// The read's deadline came; ignored if it is not yet due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            self.closing = true;
        }
    }

    pub fn out(&self) -> &[u8] {
        &self.out
    }

    pub fn sent(&mut self) {
        self.out.clear();
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// What to do next; the requests that arrived are decided by `market`
    /// at `now_ms` (wall-clock ms, what T's time is checked against).
    pub fn poll_action(&mut self, market: &impl Exchanges, now: Instant, now_ms: u64) -> Action {
        while !self.closing {
            let frame = match self.split.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    self.malformed();
                    break;
                }
            };
            if market::is_keepalive(&frame, market::TYPE_PING) {
                market::encode_keepalive(market::TYPE_PONG, &mut self.out);
                continue;
            }
            let Ok(reqs) = market::decode_requests(&frame) else {
                self.malformed();
                break;
            };
            let replies: Vec<ExchangeReply> = reqs
                .iter()
                .map(|r| {
                    let result = market.exchange(r, self.binding, now_ms);
                    self.events.push_back(match &result {
                        Ok(_) => Event::Accepted {
                            user: r.user.clone(),
                            request_id: r.request_id,
                        },
                        Err(code) => Event::Refused {
                            user: r.user.clone(),
                            request_id: r.request_id,
                            code: *code,
                        },
                    });
                    ExchangeReply {
                        request_id: r.request_id,
                        result,
                    }
                })
                .collect();
            market::encode_replies(&replies, &mut self.out);
        }
        if self.closing {
            return Action::Close;
        }
        if !self.out.is_empty() {
            return Action::Send;
        }
        let until = now + self.idle;
        self.deadline = Some(until);
        Action::Read { until }
    }

    fn malformed(&mut self) {
        self.events.push_back(Event::Malformed);
        self.closing = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::point::{Group, Mode, Point};
    use std::cell::RefCell;

    /// Accepts every request whose binding is the channel's, and records
    /// the time it was asked at.
    struct Market(RefCell<Vec<u64>>);

    impl Exchanges for Market {
        fn exchange(
            &self,
            r: &ExchangeRequest,
            binding: [u8; 32],
            now_ms: u64,
        ) -> Result<Accepted, ErrorCode> {
            self.0.borrow_mut().push(now_ms);
            if binding != [1; 32] || r.user == "mallory" {
                return Err(ErrorCode::BadSignature);
            }
            Ok(Accepted {
                session_id: [r.request_id as u8; 16],
                ephemeral: Point::new(Group::X25519, &[9; 32]).unwrap(),
                expiry_ms: now_ms + 1,
                endpoint: "e".into(),
            })
        }
    }

    fn request(id: u64, user: &str) -> ExchangeRequest {
        ExchangeRequest {
            request_id: id,
            mode: Mode::Full,
            user: user.into(),
            user_cert: vec![1],
            ephemeral: Point::new(Group::X25519, &[2; 32]).unwrap(),
            time_ms: 5,
            nonce: [3; 16],
            signature: vec![4],
        }
    }

    /// The replies in what the market sent, and its pongs.
    fn answers(bytes: &[u8]) -> (Vec<ExchangeReply>, usize) {
        let mut split = Splitter::default();
        split.push(bytes);
        let (mut all, mut pongs) = (Vec::new(), 0);
        while let Some(f) = split.next_frame().unwrap() {
            if market::is_keepalive(&f, market::TYPE_PONG) {
                pongs += 1;
            } else {
                all.extend(market::decode_replies(&f).unwrap());
            }
        }
        (all, pongs)
    }

    fn replies(bytes: &[u8]) -> Vec<ExchangeReply> {
        answers(bytes).0
    }

    #[test]
    fn batches_cut_anywhere_are_answered_in_order_with_pongs_in_one_send() {
        let now = Instant::now();
        let mut wire = Vec::new();
        market::encode_requests(
            [request(1, "alice"), request(2, "mallory")].iter(),
            &mut wire,
        );
        market::encode_keepalive(market::TYPE_PING, &mut wire);
        market::encode_requests([request(3, "bob")].iter(), &mut wire);
        for cut in 0..wire.len() {
            let m = Market(RefCell::new(Vec::new()));
            let mut c = ChannelCore::new([1; 32], Duration::from_secs(60));
            c.handle_bytes(&wire[..cut]);
            let mut out = Vec::new();
            if c.poll_action(&m, now, 77) == Action::Send {
                out.extend_from_slice(c.out());
                c.sent();
            }
            c.handle_bytes(&wire[cut..]);
            assert_eq!(c.poll_action(&m, now, 77), Action::Send);
            out.extend_from_slice(c.out());
            c.sent();
            let (replies, pongs) = answers(&out);
            assert_eq!(pongs, 1);
            let ids: Vec<(u64, bool)> = replies
                .iter()
                .map(|r| (r.request_id, r.result.is_ok()))
                .collect();
            assert_eq!(ids, [(1, true), (2, false), (3, true)], "cut at {cut}");
            assert_eq!(*m.0.borrow(), [77, 77, 77]);
            assert!(matches!(c.poll_action(&m, now, 77), Action::Read { .. }));
        }
    }

    #[test]
    fn another_channels_binding_is_refused_and_garbage_closes() {
        let now = Instant::now();
        let m = Market(RefCell::new(Vec::new()));
        let mut c = ChannelCore::new([2; 32], Duration::from_secs(60));
        let mut wire = Vec::new();
        market::encode_requests([request(1, "alice")].iter(), &mut wire);
        c.handle_bytes(&wire);
        assert_eq!(c.poll_action(&m, now, 0), Action::Send);
        assert!(replies(c.out())[0].result.is_err());
        c.sent();
        assert!(matches!(c.poll_event(), Some(Event::Refused { .. })));
        c.handle_bytes(&[0, 0, 0, 2, 0xff, 0xff]);
        assert_eq!(c.poll_action(&m, now, 0), Action::Close);
        assert_eq!(c.poll_event(), Some(Event::Malformed));
    }

    #[test]
    fn a_silent_channel_closes_at_its_idle_deadline() {
        let t0 = Instant::now();
        let m = Market(RefCell::new(Vec::new()));
        let mut c = ChannelCore::new([1; 32], Duration::from_secs(60));
        let Action::Read { until } = c.poll_action(&m, t0, 0) else {
            panic!()
        };
        assert_eq!(until, t0 + Duration::from_secs(60));
        c.handle_timeout(until - Duration::from_millis(1));
        assert!(matches!(c.poll_action(&m, t0, 0), Action::Read { .. }));
        let Action::Read { until } = c.poll_action(&m, t0, 0) else {
            panic!()
        };
        c.handle_timeout(until);
        assert_eq!(c.poll_action(&m, until, 0), Action::Close);
    }
}
