//! The broker's market link as a state machine, sans-IO: batching, the
//! market timeout, keepalive, loss and redial with jittered backoff.
//!
//! ```text
//!            dial ok                 batch sent              all replies
//!   Dial ──────────────► Idle ─────────────────► Awaiting ──────────────► Idle
//!    ▲  dial failed       │ keepalive passed        │ silent / lost / bad frame
//!    │    ▼               ▼                         ▼
//!    └── Down ◄──────── Closing ◄── Pinging ── no Pong (or lost)
//!      (backoff)   (the shell closes the channel)
//! ```
//!
//! The shell asks [`LinkCore::poll_action`] what to do next (dial, send,
//! read until, wait for a request until, close), does it, and reports the
//! outcome with a `handle_*` call; it then drains [`LinkCore::poll_event`]
//! for replies and state changes. Time enters only as the `now` of each
//! call and randomness only from the seed, so a simulation replays a run
//! exactly (tests/sim.rs). One batch is in flight at a time: requests that
//! arrive meanwhile form the next batch, which grows with the load.
//!
//! `T` is whatever the shell needs to answer a request (a oneshot sender
//! in the broker, a number in the simulation).

use super::ErrorCode;
use super::market::{self, Accepted, ExchangeRequest, Splitter};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Why a request got no acceptance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The market's answer, or the link's at once (down, queue full).
    Code(ErrorCode),
    /// The channel broke with the request queued or sent and unanswered.
    /// The request was signed for that channel's binding, so it can only
    /// be asked again, signed afresh, on the next channel.
    Broken,
}

impl From<ErrorCode> for Failure {
    fn from(c: ErrorCode) -> Self {
        Self::Code(c)
    }
}

impl Failure {
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Code(c) => c,
            Self::Broken => ErrorCode::MarketUnavailable,
        }
    }
}

pub type Reply = Result<Accepted, Failure>;

/// The link's timings and sizes (from `[exchange]`).
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    pub batch_max: usize,
    pub batch_delay: Duration,
    pub market_timeout: Duration,
    pub keepalive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Requests held for the next batch, at most.
    pub queue: usize,
}

/// What the shell does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a channel (the shell bounds it by the market timeout), then
    /// [`LinkCore::handle_dialled`].
    Dial,
    /// Write these bytes, then [`LinkCore::handle_sent`].
    Send(Vec<u8>),
    /// Read, then [`LinkCore::handle_bytes`] or [`LinkCore::handle_lost`];
    /// at `until`, [`LinkCore::handle_timeout`].
    Read { until: Instant },
    /// Wait for a request ([`LinkCore::handle_submit`]) until `until`, then
    /// ask again.
    Wait { until: Instant },
    /// Close the channel, then [`LinkCore::handle_closed`].
    Close,
}

/// What happened, for the shell to act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<T> {
    Reply(T, Reply),
    /// A channel is up with this binding (before [`Event::Dialled`]).
    Up([u8; 32]),
    /// A dial ended, either way.
    Dialled,
    /// A dial failed; `first` for the first failure since the link was up.
    DialFailed {
        error: String,
        first: bool,
    },
    /// The channel went down (after it was up).
    Down {
        lost: bool,
    },
    /// A batch of this many requests was sent.
    Batch(usize),
    /// A batch was answered whole, this long after it was sent.
    RoundTrip(Duration),
    /// The market sent a frame that does not parse.
    Malformed(String),
}

/// Sent requests by id. Ordered, so a loss answers them in one order on
/// every run: the simulation's trace depends on nothing but its seed.
type Waiting<T> = BTreeMap<u64, T>;

struct Queued<T> {
    req: ExchangeRequest,
    binding: [u8; 32],
    reply: T,
}

enum Phase<T> {
    Dial,
    Dialling,
    /// Backing off after a loss or a failed dial.
    Down {
        until: Instant,
    },
    Idle {
        binding: [u8; 32],
        ping_at: Instant,
        /// Set while a batch gathers company (`batch_delay`).
        gather_until: Option<Instant>,
    },
    /// A batch is being written.
    Sending {
        binding: [u8; 32],
        waiting: Waiting<T>,
        sent_at: Instant,
    },
    Awaiting {
        binding: [u8; 32],
        waiting: Waiting<T>,
        sent_at: Instant,
        until: Instant,
    },
    /// A Ping is being written (`until` unset) or its Pong awaited.
    Pinging {
        binding: [u8; 32],
        until: Option<Instant>,
    },
    Closing,
}

pub struct LinkCore<T> {
    t: Timers,
    phase: Phase<T>,
    queue: VecDeque<Queued<T>>,
    split: Splitter,
    backoff: Duration,
    /// A dial failure was reported since the link was last up.
    warned: bool,
    events: VecDeque<Event<T>>,
    rng: StdRng,
}

impl<T> LinkCore<T> {
    /// A link that dials first. `seed` drives only the backoff's jitter.
    pub fn new(t: Timers, seed: u64) -> Self {
        Self {
            phase: Phase::Dial,
            queue: VecDeque::new(),
            split: Splitter::default(),
            backoff: t.reconnect_min,
            warned: false,
            events: VecDeque::new(),
            rng: StdRng::seed_from_u64(seed),
            t,
        }
    }

    /// The binding of the channel that is up, if one is.
    pub fn binding(&self) -> Option<[u8; 32]> {
        match &self.phase {
            Phase::Idle { binding, .. }
            | Phase::Sending { binding, .. }
            | Phase::Awaiting { binding, .. }
            | Phase::Pinging { binding, .. } => Some(*binding),
            _ => None,
        }
    }

    /// Requests held for the next batch.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        match &self.phase {
            Phase::Sending { waiting, .. } | Phase::Awaiting { waiting, .. } => waiting.len(),
            _ => 0,
        }
    }

    pub fn poll_event(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }

    /// A request signed for the channel `binding`. One signed for another
    /// channel answers [`Failure::Broken`]; one beyond the queue, `busy`.
    pub fn handle_submit(
        &mut self,
        now: Instant,
        req: ExchangeRequest,
        binding: [u8; 32],
        reply: T,
    ) {
        if self.binding() != Some(binding) {
            return self.answer(reply, Err(Failure::Broken));
        }
        if self.queue.len() >= self.t.queue.max(1) {
            return self.answer(reply, Err(Failure::Code(ErrorCode::Busy)));
        }
        if let Phase::Idle { gather_until, .. } = &mut self.phase
            && gather_until.is_none()
            && self.queue.is_empty()
            && !self.t.batch_delay.is_zero()
        {
            *gather_until = Some(now + self.t.batch_delay);
        }
        self.queue.push_back(Queued {
            req,
            binding,
            reply,
        });
    }

    pub fn poll_action(&mut self, now: Instant) -> Action {
        match &mut self.phase {
            Phase::Dial => {
                self.phase = Phase::Dialling;
                Action::Dial
            }
            // The shell answers with handle_dialled; asked again meanwhile,
            // it waits for that.
            Phase::Dialling => Action::Wait { until: now },
            Phase::Down { until } if now >= *until => {
                self.phase = Phase::Dialling;
                Action::Dial
            }
            Phase::Down { until } => Action::Wait { until: *until },
            Phase::Idle {
                binding,
                ping_at,
                gather_until,
            } => {
                let binding = *binding;
                if !self.queue.is_empty() {
                    let full = self.queue.len() >= self.t.batch_max;
                    match *gather_until {
                        Some(until) if !full && now < until => return Action::Wait { until },
                        _ => return self.send_batch(now, binding),
                    }
                }
                if now >= *ping_at {
                    self.phase = Phase::Pinging {
                        binding,
                        until: None,
                    };
                    let mut out = Vec::with_capacity(8);
                    market::encode_keepalive(market::TYPE_PING, &mut out);
                    return Action::Send(out);
                }
                Action::Wait { until: *ping_at }
            }
            // Asked again before handle_sent: nothing new to do.
            Phase::Sending { .. } | Phase::Pinging { until: None, .. } => {
                Action::Wait { until: now }
            }
            Phase::Awaiting { until, .. } => Action::Read { until: *until },
            Phase::Pinging {
                until: Some(until), ..
            } => Action::Read { until: *until },
            Phase::Closing => Action::Close,
        }
    }

    fn send_batch(&mut self, now: Instant, binding: [u8; 32]) -> Action {
        let take = self.queue.len().min(self.t.batch_max.max(1));
        let mut waiting = BTreeMap::new();
        let mut reqs = Vec::with_capacity(take);
        for q in self.queue.drain(..take) {
            // Only requests for this channel are queued (handle_submit).
            debug_assert_eq!(q.binding, binding);
            waiting.insert(q.req.request_id, q.reply);
            reqs.push(q.req);
        }
        let mut out = Vec::with_capacity(1024 * reqs.len());
        market::encode_requests(reqs.iter(), &mut out);
        self.events.push_back(Event::Batch(reqs.len()));
        self.phase = Phase::Sending {
            binding,
            waiting,
            sent_at: now,
        };
        Action::Send(out)
    }

    pub fn handle_dialled(&mut self, now: Instant, r: Result<[u8; 32], String>) {
        match r {
            Ok(binding) => {
                self.events.push_back(Event::Up(binding));
                self.events.push_back(Event::Dialled);
                self.warned = false;
                self.backoff = self.t.reconnect_min;
                self.split = Splitter::default();
                self.phase = Phase::Idle {
                    binding,
                    ping_at: now + self.t.keepalive,
                    gather_until: None,
                };
            }
            Err(error) => {
                self.events.push_back(Event::Dialled);
                let first = !std::mem::replace(&mut self.warned, true);
                self.events.push_back(Event::DialFailed { error, first });
                self.back_off(now);
            }
        }
    }

    /// Enters the backoff. Its jitter (a random half to whole) keeps the
    /// cores, and brokers, that lost one market together from redialling
    /// it in step.
    fn back_off(&mut self, now: Instant) {
        let jitter = self.rng.random_range(0.5..=1.0);
        self.phase = Phase::Down {
            until: now + self.backoff.mul_f64(jitter),
        };
        self.backoff = (self.backoff * 2).min(self.t.reconnect_max);
    }

    pub fn handle_sent(&mut self, now: Instant, ok: bool) {
        if !ok {
            return self.lose(Failure::Broken);
        }
        let until = now + self.t.market_timeout;
        match std::mem::replace(&mut self.phase, Phase::Closing) {
            Phase::Sending {
                binding,
                waiting,
                sent_at,
            } => {
                self.phase = Phase::Awaiting {
                    binding,
                    waiting,
                    sent_at,
                    until,
                }
            }
            Phase::Pinging {
                binding,
                until: None,
            } => {
                self.phase = Phase::Pinging {
                    binding,
                    until: Some(until),
                }
            }
            other => self.phase = other,
        }
    }

    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) {
        self.split.push(bytes);
        loop {
            let frame = match self.split.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => return self.malformed(e.to_string()),
            };
            match &mut self.phase {
                Phase::Pinging { binding, .. } => {
                    if !market::is_keepalive(&frame, market::TYPE_PONG) {
                        return self.malformed("not a Pong".into());
                    }
                    let binding = *binding;
                    self.idle(now, binding);
                }
                Phase::Awaiting {
                    binding,
                    waiting,
                    sent_at,
                    ..
                } => {
                    let replies = match market::decode_replies(&frame) {
                        Ok(r) => r,
                        Err(e) => return self.malformed(e.to_string()),
                    };
                    for r in replies {
                        // An id not asked for (or answered twice) is dropped:
                        // each request gets one answer, its own.
                        if let Some(tx) = waiting.remove(&r.request_id) {
                            self.events
                                .push_back(Event::Reply(tx, r.result.map_err(Failure::Code)));
                        }
                    }
                    if waiting.is_empty() {
                        let (binding, rtt) = (*binding, now.saturating_duration_since(*sent_at));
                        self.events.push_back(Event::RoundTrip(rtt));
                        self.idle(now, binding);
                    }
                }
                // Nothing asked: the market speaks out of turn.
                _ => return self.malformed("a frame with nothing asked".into()),
            }
        }
    }

    fn idle(&mut self, now: Instant, binding: [u8; 32]) {
        let gather_until = (!self.queue.is_empty() && !self.t.batch_delay.is_zero()).then_some(now);
        self.phase = Phase::Idle {
            binding,
            ping_at: now + self.t.keepalive,
            gather_until,
        };
    }

    fn malformed(&mut self, why: String) {
        self.events.push_back(Event::Malformed(why));
        self.lose(Failure::Code(ErrorCode::MarketUnavailable));
    }

    /// The read or the send found the channel gone.
    pub fn handle_lost(&mut self, _now: Instant) {
        self.lose(Failure::Broken);
    }

    /// A `Read` deadline passed: the market is silent, not gone, so asking
    /// again would double the wait; a missing Pong means the channel is dead.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Awaiting { until, .. } if now >= *until => {
                self.lose(Failure::Code(ErrorCode::MarketTimeout))
            }
            Phase::Pinging {
                until: Some(until), ..
            } if now >= *until => self.lose(Failure::Broken),
            _ => {}
        }
    }

    /// The channel is done for: what was sent on it gets `in_flight`, what
    /// was queued for it [`Failure::Broken`] (it can be asked again).
    fn lose(&mut self, in_flight: Failure) {
        self.go_down(in_flight, true);
    }

    /// Leaves an up channel (for `Closing`), answering what was sent on it
    /// with `in_flight` and what was queued with [`Failure::Broken`]; a
    /// link that was not up stays as it is.
    fn go_down(&mut self, in_flight: Failure, lost: bool) {
        let waiting = match std::mem::replace(&mut self.phase, Phase::Closing) {
            Phase::Sending { waiting, .. } | Phase::Awaiting { waiting, .. } => Some(waiting),
            Phase::Idle { .. } | Phase::Pinging { .. } => None,
            other => {
                self.phase = other;
                return;
            }
        };
        self.events.push_back(Event::Down { lost });
        for (_, tx) in waiting.into_iter().flatten() {
            self.events.push_back(Event::Reply(tx, Err(in_flight)));
        }
        self.fail_queued(Failure::Broken);
    }

    fn fail_queued(&mut self, why: Failure) {
        while let Some(q) = self.queue.pop_front() {
            self.events.push_back(Event::Reply(q.reply, Err(why)));
        }
    }

    /// The shell closed the channel: back off, then redial.
    pub fn handle_closed(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Closing) {
            self.back_off(now);
        }
    }

    /// Every requester is gone: answer what is left; the shell closes.
    pub fn handle_shutdown(&mut self) {
        // Only an up link holds requests (`handle_submit` queues a request
        // only for the current binding).
        self.go_down(Failure::Broken, false);
        debug_assert!(self.queue.is_empty());
        self.phase = Phase::Closing;
    }

    fn answer(&mut self, reply: T, r: Reply) {
        self.events.push_back(Event::Reply(reply, r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::market::ExchangeReply;
    use crate::proto::point::{Group, Mode, Point};

    fn point(b: u8) -> Point {
        Point::new(Group::X25519, &[b; 32]).unwrap()
    }

    fn timers() -> Timers {
        Timers {
            batch_max: 4,
            batch_delay: Duration::ZERO,
            market_timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(800),
            queue: 8,
        }
    }

    fn req(id: u64) -> ExchangeRequest {
        ExchangeRequest {
            request_id: id,
            mode: Mode::Full,
            user: "u".into(),
            user_cert: vec![1],
            ephemeral: point(9),
            time_ms: 1,
            nonce: [0; 16],
            signature: vec![2],
        }
    }

    fn accepted(id: u64) -> Accepted {
        let mut session_id = [0; 16];
        session_id[..8].copy_from_slice(&id.to_be_bytes());
        Accepted {
            session_id,
            ephemeral: point(7),
            expiry_ms: 5,
            endpoint: "e".into(),
        }
    }

    fn replies(ids: &[u64]) -> Vec<u8> {
        let r: Vec<_> = ids
            .iter()
            .map(|&id| ExchangeReply {
                request_id: id,
                result: Ok(accepted(id)),
            })
            .collect();
        let mut out = Vec::new();
        market::encode_replies(&r, &mut out);
        out
    }

    fn events(l: &mut LinkCore<u64>) -> Vec<Event<u64>> {
        std::iter::from_fn(|| l.poll_event()).collect()
    }

    /// Request `id`, sent in a batch of its own.
    fn sent_one(l: &mut LinkCore<u64>, now: Instant, id: u64) {
        l.handle_submit(now, req(id), [1; 32], id);
        assert!(matches!(l.poll_action(now), Action::Send(_)));
        l.handle_sent(now, true);
    }

    fn up(now: Instant) -> LinkCore<u64> {
        let mut l = LinkCore::new(timers(), 1);
        assert_eq!(l.poll_action(now), Action::Dial);
        l.handle_dialled(now, Ok([1; 32]));
        assert_eq!(events(&mut l), [Event::Up([1; 32]), Event::Dialled]);
        l
    }

    #[test]
    fn a_batch_takes_what_is_queued_and_each_reply_goes_to_its_asker() {
        let now = Instant::now();
        let mut l = up(now);
        for id in [10, 11, 12] {
            l.handle_submit(now, req(id), [1; 32], id);
        }
        assert!(matches!(l.poll_action(now), Action::Send(_)));
        l.handle_sent(now, true);
        assert!(matches!(l.poll_action(now), Action::Read { .. }));
        // Out of order, with an id never asked and a duplicate.
        l.handle_bytes(now, &replies(&[12, 99, 10, 12]));
        l.handle_bytes(now, &replies(&[11]));
        let ev = events(&mut l);
        assert_eq!(ev[0], Event::Batch(3));
        let got: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                Event::Reply(t, Ok(a)) => Some((*t, a.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            got,
            [(12, accepted(12)), (10, accepted(10)), (11, accepted(11))]
        );
        assert!(matches!(l.poll_action(now), Action::Wait { .. }));
    }

    #[test]
    fn a_request_for_another_channel_or_beyond_the_queue_is_refused_at_once() {
        let now = Instant::now();
        let mut l = up(now);
        l.handle_submit(now, req(1), [2; 32], 1);
        for id in 2..12 {
            l.handle_submit(now, req(id), [1; 32], id);
        }
        let ev = events(&mut l);
        assert_eq!(ev[0], Event::Reply(1, Err(Failure::Broken)));
        assert_eq!(
            ev[1..],
            [
                Event::Reply(10, Err(ErrorCode::Busy.into())),
                Event::Reply(11, Err(ErrorCode::Busy.into()))
            ]
        );
        assert_eq!(l.queued(), 8);
    }

    #[test]
    fn silence_times_out_the_batch_and_a_loss_breaks_it_then_backoff_grows_to_its_cap() {
        let now = Instant::now();
        let mut l = up(now);
        sent_one(&mut l, now, 1);
        l.handle_timeout(now + Duration::from_secs(1));
        assert!(matches!(l.poll_action(now), Action::Read { .. }), "not yet");
        l.handle_timeout(now + Duration::from_secs(2));
        let ev = events(&mut l);
        assert!(ev.contains(&Event::Reply(1, Err(ErrorCode::MarketTimeout.into()))));
        assert_eq!(l.poll_action(now), Action::Close);
        l.handle_closed(now);
        // Backoff: jittered within [half, whole] of 100, 200, 400, 800, 800 ms.
        let mut t = now;
        for cap in [100u64, 200, 400, 800, 800] {
            let Action::Wait { until } = l.poll_action(t) else {
                panic!("not backing off")
            };
            let d = until - t;
            assert!(
                d >= Duration::from_millis(cap / 2) && d <= Duration::from_millis(cap),
                "{d:?}"
            );
            t = until;
            assert_eq!(l.poll_action(t), Action::Dial);
            l.handle_dialled(t, Err("refused".into()));
        }
        let ev = events(&mut l);
        let firsts: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                Event::DialFailed { first, .. } => Some(*first),
                _ => None,
            })
            .collect();
        assert_eq!(firsts, [true, false, false, false, false]);
    }

    #[test]
    fn a_lost_channel_breaks_what_was_sent_and_queued() {
        let now = Instant::now();
        let mut l = up(now);
        sent_one(&mut l, now, 1);
        l.handle_submit(now, req(2), [1; 32], 2);
        l.handle_lost(now);
        let ev = events(&mut l);
        assert!(ev.contains(&Event::Down { lost: true }));
        assert!(ev.contains(&Event::Reply(1, Err(Failure::Broken))));
        assert!(ev.contains(&Event::Reply(2, Err(Failure::Broken))));
        assert_eq!(l.binding(), None);
    }

    #[test]
    fn an_idle_channel_is_pinged_and_a_missing_pong_takes_it_down() {
        let now = Instant::now();
        let mut l = up(now);
        let Action::Wait { until } = l.poll_action(now) else {
            panic!()
        };
        assert_eq!(until, now + Duration::from_secs(10));
        let mut ping = Vec::new();
        market::encode_keepalive(market::TYPE_PING, &mut ping);
        assert_eq!(l.poll_action(until), Action::Send(ping));
        l.handle_sent(until, true);
        let mut pong = Vec::new();
        market::encode_keepalive(market::TYPE_PONG, &mut pong);
        l.handle_bytes(until, &pong);
        assert!(matches!(l.poll_action(until), Action::Wait { .. }));
        let later = until + Duration::from_secs(10);
        let _ = l.poll_action(later);
        l.handle_sent(later, true);
        l.handle_timeout(later + Duration::from_secs(2));
        assert!(events(&mut l).contains(&Event::Down { lost: true }));
        assert_eq!(l.poll_action(later), Action::Close);
    }

    #[test]
    fn batch_delay_waits_for_company_unless_the_batch_is_full() {
        let now = Instant::now();
        let mut l = LinkCore::new(
            Timers {
                batch_delay: Duration::from_millis(5),
                ..timers()
            },
            1,
        );
        let _ = l.poll_action(now);
        l.handle_dialled(now, Ok([1; 32]));
        l.handle_submit(now, req(1), [1; 32], 1);
        assert_eq!(
            l.poll_action(now),
            Action::Wait {
                until: now + Duration::from_millis(5)
            }
        );
        for id in 2..=4 {
            l.handle_submit(now, req(id), [1; 32], id);
        }
        assert!(matches!(l.poll_action(now), Action::Send(_)));
    }
}
