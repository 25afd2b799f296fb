//! Deterministic simulation, in the manner of TigerBeetle's VOPR: from one
//! seed, in one thread, the sans-IO cores run against simulated peers and
//! faults, and invariants are checked after every step.
//!
//! - `link`: the market link's core ([`LinkCore`]), two broker cores times
//!   three markets, many terminals' requests, against markets (each
//!   channel's market side the market's own [`ChannelCore`]) that answer
//!   out of order, duplicate and corrupt frames, go silent, die and come
//!   back, over channels that break, deliver bytes in random pieces and
//!   late, broker restarts and clock jumps.
//! - `broker`: terminals on those links, each with its connection's core
//!   ([`ConnCore`]: frame decoding, pipelining, timeouts, revocation, the
//!   access session) and its exchanges ([`Flow`]), against markets that
//!   check the signature over T and derive X. Terminals pipeline frames,
//!   send them cut at random points, stall mid-frame, and are revoked; each
//!   frame must be answered once and in order, the X a terminal gets must
//!   be the one the market issued to it, and once the faults stop every
//!   terminal must broker a key again.
//! - `wallet`: the real ledger ([`GroupLedger`] over a real SQLite file)
//!   with storage and MAC faults injected under it, a commit that lands but
//!   whose acknowledgement is lost, client retries, crashes (the ledger
//!   dropped and reopened) at any step, and its clock jumping forward by
//!   days and back by hours.
//!
//! `SIM_SEEDS=N` runs seeds 0..N (CI runs the default), `SIM_SEED=S` one
//! seed; `make sim SEEDS=N`. A failing seed prints the command that replays
//! it. Each seed's trace hash depends on nothing but the seed; a test runs
//! seeds twice and compares.

use aws_lc_rs::digest;
use keybroker::clock::ManualClock;
use keybroker::config::Kx;
use keybroker::exchange::flow::{Action as FlowAction, Flow, Fresh, Params};
use keybroker::exchange::keyops::{KeyDone, KeyOps, SoftCard, SoftCardError};
use keybroker::exchange::{Ephemeral, Transcript, verify_signature};
use keybroker::market::channel::{
    Action as ChannelAction, ChannelCore, Event as ChannelEvent, Exchanges,
};
use keybroker::proto::ErrorCode;
use keybroker::proto::access::{Frame, FrameDecoder, Message, Password, encode};
use keybroker::proto::conn::{
    Action as ConnAction, ConnCore, Event as ConnEvent, Refused, Timeouts, Work,
};
use keybroker::proto::link::{Action, Event, Failure, LinkCore, Timers};
use keybroker::proto::market::{self, Accepted, ExchangeRequest, Splitter};
use keybroker::proto::point::{Group, Mode, Point};
use keybroker::proto::session::{LoginCheck, ReleaseCheck, Request};
use keybroker::wallet::anchor::AnchorConfig;
use keybroker::wallet::chain::{ChainMac, SoftChainMac};
use keybroker::wallet::ledger::{GroupLedger, LedgerConfig};
use keybroker::wallet::sqlite::SqliteStore;
use keybroker::wallet::store::{DecisionRow, KeyedDecision, NewMail, Scanned, Store};
use keybroker::wallet::{
    Amount, CancelRequest, Decision, Entry, EntryKind, Ledger, PurchaseRequest, TopUpRequest,
    WalletError, WalletResult,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seeds CI runs for each world.
const CI_SEEDS: u64 = 40;
const WALLET_CI_SEEDS: u64 = 8;
const BROKER_CI_SEEDS: u64 = 16;
/// Seeds that once failed; they run in every run.
const LINK_REGRESSIONS: &[u64] = &[];
const WALLET_REGRESSIONS: &[u64] = &[];
/// 0 and 5: a Derive job refused by a full HSM queue left its kx=hsm
/// ephemeral in the token (fixed by `Flow::handle_key_refused`).
const BROKER_REGRESSIONS: &[u64] = &[0, 5];

fn seeds(ci: u64, regressions: &[u64]) -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n = std::env::var("SIM_SEEDS").map_or(ci, |s| s.parse().expect("SIM_SEEDS is a number"));
    regressions.iter().copied().chain(0..n).collect()
}

/// What a world's run did: steps taken and faults injected.
trait Tally {
    fn steps_and_faults(&self) -> (u64, u64);
}

impl Tally for LinkStats {
    fn steps_and_faults(&self) -> (u64, u64) {
        (self.steps, self.faults)
    }
}

impl Tally for BrokerStats {
    fn steps_and_faults(&self) -> (u64, u64) {
        self.link.steps_and_faults()
    }
}

impl Tally for WalletStats {
    fn steps_and_faults(&self) -> (u64, u64) {
        (self.ops, self.faults + self.crashes + self.jumps)
    }
}

/// Runs `world` for every seed; a failure names the command that replays it.
fn run_seeds<S: std::fmt::Debug + Tally>(name: &str, seeds: Vec<u64>, world: impl Fn(u64) -> S) {
    let started = Instant::now();
    let mut last = None;
    let (mut steps, mut faults) = (0, 0);
    for &seed in &seeds {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world(seed)));
        match r {
            Ok(stats) => {
                let (s, f) = stats.steps_and_faults();
                steps += s;
                faults += f;
                last = Some(stats);
            }
            Err(e) => {
                eprintln!(
                    "sim {name}: seed {seed} failed; replay: SIM_SEED={seed} cargo test --release --test sim -- {name} --nocapture"
                );
                std::panic::resume_unwind(e);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "sim {name}: {} seeds in {secs:.1} s, {steps} steps ({:.0}/s), {faults} faults ({:.0}/s); last: {last:?}",
        seeds.len(),
        steps as f64 / secs,
        faults as f64 / secs,
    );
}

struct Trace(digest::Context);

impl Trace {
    fn new() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }
    fn note(&mut self, what: impl std::fmt::Debug) {
        self.0.update(format!("{what:?}\n").as_bytes());
    }
    fn hash(self) -> String {
        hex::encode(self.0.finish().as_ref())
    }
}

// ---------------------------------------------------------------- link --

const CORES: usize = 2;
const MARKETS: usize = 3;
const STEPS: u64 = 4_000;
/// The most a packet is late, in simulated ms.
const MAX_DELAY_MS: u64 = 40;

fn link_timers(rng: &mut StdRng) -> Timers {
    Timers {
        batch_max: 8,
        batch_delay: Duration::from_millis(rng.random_range(0..=1)),
        market_timeout: Duration::from_millis(500),
        keepalive: Duration::from_millis(2_000),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(400),
        queue: 32,
    }
}

/// One TCP connection between a link and a market, both directions.
struct Conn {
    to_market: VecDeque<(u64, Vec<u8>)>,
    to_broker: VecDeque<(u64, Vec<u8>)>,
    /// The market's side of the channel.
    market: ChannelCore,
    broken: bool,
}

/// How long the market keeps a silent channel (the link pings every 2 s).
const MARKET_IDLE: Duration = Duration::from_secs(30);

/// The simulated market's decisions, for the market's channel core: with
/// terminals (the broker world), the real checks of T; without, a reply
/// derived from the request.
struct Decide<'a> {
    market: usize,
    broker: RefCell<Option<&'a mut Broker>>,
}

impl Exchanges for Decide<'_> {
    fn exchange(
        &self,
        r: &ExchangeRequest,
        binding: [u8; 32],
        _now_ms: u64,
    ) -> Result<Accepted, ErrorCode> {
        match self.broker.borrow_mut().as_mut() {
            Some(b) => b.answer(self.market, binding, r),
            None => market_answer(self.market, r.request_id, &r.user),
        }
    }
}

/// What the market sent, as the faults deliver it: each batch's replies
/// in any order, in one frame or several, some twice, and now and then a
/// frame corrupted (the link must drop the channel). Pongs pass.
fn garble(rng: &mut StdRng, stats: &mut LinkStats, calm: bool, sent: &[u8]) -> Vec<u8> {
    let mut split = Splitter::default();
    split.push(sent);
    let mut out = Vec::new();
    while let Some(f) = split.next_frame().expect("the market sends whole frames") {
        if market::is_keepalive(&f, market::TYPE_PONG) {
            market::encode_keepalive(market::TYPE_PONG, &mut out);
            continue;
        }
        let mut replies = market::decode_replies(&f).expect("the market sends valid replies");
        for k in (1..replies.len()).rev() {
            let j = rng.random_range(0..=k);
            replies.swap(k, j);
        }
        let cut = rng.random_range(1..=replies.len().max(1));
        market::encode_replies(&replies[..cut.min(replies.len())], &mut out);
        if cut < replies.len() {
            market::encode_replies(&replies[cut..], &mut out);
        }
        if rng.random_bool(0.05) && !replies.is_empty() {
            stats.faults += 1;
            market::encode_replies(&replies[..1], &mut out);
        }
    }
    if rng.random_bool(0.003) && !calm {
        stats.faults += 1;
        out[4] ^= 0x40;
    }
    out
}

struct SimMarket {
    alive: bool,
    /// Reads but answers nothing until then (simulated ms).
    silent_until: u64,
    back_at: u64,
}

struct Lk {
    core: LinkCore<u64>,
    market: usize,
    conn: Option<Conn>,
}

struct Asked {
    link: usize,
    request_id: u64,
    user: String,
    at: u64,
}

#[derive(Debug, Default)]
struct LinkStats {
    steps: u64,
    faults: u64,
    requests: u64,
    accepted: u64,
    failed: u64,
    sim_ms: u64,
    hash: String,
}

struct LinkWorld {
    rng: StdRng,
    base: Instant,
    /// Simulated ms since `base`.
    t: u64,
    timers: Timers,
    links: Vec<Lk>,
    markets: Vec<SimMarket>,
    asked: BTreeMap<u64, Asked>,
    next_token: u64,
    next_request: u64,
    trace: Trace,
    stats: LinkStats,
    /// Terminals brokered through the links (the `broker` world), if any.
    broker: Option<Broker>,
    /// No faults: markets up, nothing dropped, corrupted or failed.
    calm: bool,
}

/// What the market answers to request `request_id` of `user`, so a reply
/// proves whose it is: the session id and key are derived from the market,
/// the request id and the user. One request in 13 is refused by the
/// market with a code.
fn market_answer(market: usize, request_id: u64, user: &str) -> Result<Accepted, ErrorCode> {
    if request_id.is_multiple_of(13) {
        return Err(ErrorCode::BadSignature);
    }
    let d = digest::digest(
        &digest::SHA256,
        format!("{market}/{request_id}/{user}").as_bytes(),
    );
    let mut session_id = [0; 16];
    session_id.copy_from_slice(&d.as_ref()[..16]);
    Ok(Accepted {
        session_id,
        ephemeral: Point::new(Group::X25519, &d.as_ref()[..32]).unwrap(),
        expiry_ms: request_id,
        endpoint: format!("m{market}"),
    })
}

impl LinkWorld {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let timers = link_timers(&mut rng);
        let links = (0..CORES * MARKETS)
            .map(|i| Lk {
                core: LinkCore::new(timers, rng.random()),
                market: i % MARKETS,
                conn: None,
            })
            .collect();
        let markets = (0..MARKETS)
            .map(|_| SimMarket {
                alive: true,
                silent_until: 0,
                back_at: 0,
            })
            .collect();
        Self {
            rng,
            base: Instant::now(),
            t: 0,
            timers,
            links,
            markets,
            asked: BTreeMap::new(),
            next_token: 0,
            next_request: 1,
            trace: Trace::new(),
            stats: LinkStats::default(),
            broker: None,
            calm: false,
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.t)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn delay(&mut self) -> u64 {
        self.t + self.rng.random_range(0..=MAX_DELAY_MS)
    }

    /// A terminal asks on link `i`, as `Link::submit` would: with the
    /// binding its exchange was signed for (now and then a stale one).
    fn ask(&mut self, i: usize) {
        let Some(mut binding) = self.links[i].core.binding() else {
            // The broker answers market_unavailable before the link.
            self.trace.note(("down", i));
            return;
        };
        if self.chance(0.03) {
            binding[0] ^= 1;
        }
        let request_id = self.next_request;
        self.next_request += 1;
        let token = self.next_token;
        self.next_token += 1;
        let user = format!("u{}", self.rng.random_range(0..50));
        let req = ExchangeRequest {
            request_id,
            mode: Mode::Full,
            user: user.clone(),
            user_cert: vec![0x30; 8],
            ephemeral: Point::new(Group::X25519, &[request_id as u8; 32]).unwrap(),
            time_ms: self.t,
            nonce: [request_id as u8; 16],
            signature: vec![0x30; 8],
        };
        self.asked.insert(
            token,
            Asked {
                link: i,
                request_id,
                user,
                at: self.t,
            },
        );
        self.stats.requests += 1;
        let now = self.now();
        self.links[i].core.handle_submit(now, req, binding, token);
        self.events(i);
    }

    /// Does what link `i`'s core asks until it waits.
    fn drive(&mut self, i: usize) {
        for _ in 0..10_000 {
            let now = self.now();
            let action = self.links[i].core.poll_action(now);
            self.trace.note(("action", i, self.t, action_kind(&action)));
            match action {
                Action::Dial => {
                    let m = self.links[i].market;
                    let ok = self.markets[m].alive && !self.chance(0.05);
                    let r = if ok {
                        let binding: [u8; 32] = self.rng.random();
                        self.links[i].conn = Some(Conn {
                            to_market: VecDeque::new(),
                            to_broker: VecDeque::new(),
                            market: ChannelCore::new(binding, MARKET_IDLE),
                            broken: false,
                        });
                        Ok(binding)
                    } else {
                        Err("connection refused".into())
                    };
                    self.links[i].core.handle_dialled(now, r);
                }
                Action::Send(bytes) => {
                    let at = self.delay();
                    let ok = match &mut self.links[i].conn {
                        Some(c) if !c.broken => {
                            c.to_market.push_back((at, bytes));
                            true
                        }
                        _ => false,
                    };
                    self.links[i].core.handle_sent(now, ok);
                }
                Action::Read { until } => {
                    let t = self.t;
                    let conn = self.links[i].conn.as_ref();
                    let ready = conn.and_then(|c| c.to_broker.front().filter(|(at, _)| *at <= t));
                    let ready = ready.map(|(_, b)| b.len());
                    let broken = conn.is_none_or(|c| c.broken);
                    match ready {
                        Some(len) => {
                            // TCP delivers a stream: any cut is possible.
                            let n = self.rng.random_range(1..=len);
                            let c = self.links[i].conn.as_mut().unwrap();
                            let front = &mut c.to_broker.front_mut().unwrap().1;
                            let piece: Vec<u8> = front.drain(..n).collect();
                            if front.is_empty() {
                                c.to_broker.pop_front();
                            }
                            self.links[i].core.handle_bytes(now, &piece);
                        }
                        None if broken => self.links[i].core.handle_lost(now),
                        None if now >= until => self.links[i].core.handle_timeout(now),
                        None => break,
                    }
                }
                Action::Wait { .. } => break,
                Action::Close => {
                    self.links[i].conn = None;
                    self.links[i].core.handle_closed(now);
                }
            }
            self.events(i);
        }
        self.check(i);
    }

    /// The markets read what reached them and answer: each channel's
    /// market side is the market's own core ([`ChannelCore`]), deciding
    /// through the simulated market; what it sends then meets the faults.
    fn serve(&mut self) {
        let now = self.now();
        for i in 0..self.links.len() {
            let m = self.links[i].market;
            let (alive, silent) = (self.markets[m].alive, self.markets[m].silent_until > self.t);
            let Some(c) = &mut self.links[i].conn else {
                continue;
            };
            if !alive {
                c.broken = true;
                continue;
            }
            while c.to_market.front().is_some_and(|(at, _)| *at <= self.t) {
                let (_, b) = c.to_market.pop_front().unwrap();
                c.market.handle_bytes(&b);
            }
            if silent {
                // Hung: what came waits, and is answered late.
                continue;
            }
            let decide = Decide {
                market: m,
                broker: RefCell::new(self.broker.as_mut()),
            };
            loop {
                match c.market.poll_action(&decide, now, self.t) {
                    ChannelAction::Send => {
                        let out = garble(&mut self.rng, &mut self.stats, self.calm, c.market.out());
                        c.market.sent();
                        let at = self.t + self.rng.random_range(0..=MAX_DELAY_MS);
                        c.to_broker.push_back((at, out));
                    }
                    ChannelAction::Close => {
                        c.broken = true;
                        break;
                    }
                    ChannelAction::Read { until } if now >= until => c.market.handle_timeout(now),
                    ChannelAction::Read { .. } => break,
                }
            }
            while let Some(e) = c.market.poll_event() {
                assert_ne!(e, ChannelEvent::Malformed, "the link sent a bad frame");
            }
        }
    }

    fn fault(&mut self) {
        let r = self.rng.random_range(0..100);
        let m = self.rng.random_range(0..MARKETS);
        let i = self.rng.random_range(0..self.links.len());
        self.stats.faults += 1;
        match r {
            // The connection resets.
            0..30 => {
                if let Some(c) = &mut self.links[i].conn {
                    c.broken = true;
                }
            }
            // A market dies, and comes back later.
            30..45 => {
                self.markets[m].alive = false;
                self.markets[m].back_at = self.t + self.rng.random_range(100..3_000);
            }
            // A market hangs for a while.
            45..60 => {
                self.markets[m].silent_until = self.t + self.rng.random_range(100..1_500);
            }
            // The clock jumps. A jump is instantaneous to the cores, so a
            // request's time to end counts from it.
            60..75 => {
                self.t += self.rng.random_range(1_000..20_000);
                for a in self.asked.values_mut() {
                    a.at = self.t;
                }
            }
            // A broker core restarts: its terminals lose their requests
            // with the connection (they see it close), the market sees the
            // channel go.
            75..85 => {
                let seed = self.rng.random();
                self.links[i].core = LinkCore::new(self.timers, seed);
                self.links[i].conn = None;
                let lost: Vec<u64> = self
                    .asked
                    .iter()
                    .filter(|(_, a)| a.link == i)
                    .map(|(t, _)| *t)
                    .collect();
                for token in lost {
                    self.asked.remove(&token);
                    if let Some(b) = &mut self.broker {
                        b.lost(token);
                    }
                }
            }
            _ => self.stats.faults -= 1,
        }
        self.trace.note(("fault", r, m, i, self.t));
    }

    fn events(&mut self, i: usize) {
        while let Some(e) = self.links[i].core.poll_event() {
            if let Event::Reply(token, r) = e {
                self.reply(i, token, r);
            } else {
                self.trace.note(("event", i, &e));
            }
        }
    }

    fn reply(&mut self, i: usize, token: u64, r: Result<Accepted, Failure>) {
        let a = self.asked.remove(&token).unwrap_or_else(|| {
            panic!("reply to a request that has none outstanding: token {token}")
        });
        assert_eq!(a.link, i, "a reply came from another link");
        if let Some(b) = &mut self.broker
            && b.replied(token, &r)
        {
            self.trace.note(("reply", i, token, r.map(|a| a.expiry_ms)));
            return;
        }
        let m = self.links[i].market;
        let expected = market_answer(m, a.request_id, &a.user);
        match &r {
            Ok(acc) => {
                assert_eq!(
                    Ok(acc),
                    expected.as_ref(),
                    "X went to a session that did not ask for it"
                );
                self.stats.accepted += 1;
            }
            Err(Failure::Code(c)) if expected.as_ref().err() == Some(c) => self.stats.failed += 1,
            Err(Failure::Broken)
            | Err(Failure::Code(
                ErrorCode::MarketTimeout | ErrorCode::MarketUnavailable | ErrorCode::Busy,
            )) => self.stats.failed += 1,
            Err(other) => panic!("request {} failed with {other:?}", a.request_id),
        }
        self.trace.note(("reply", i, token, r.map(|a| a.expiry_ms)));
    }

    fn check(&self, i: usize) {
        let core = &self.links[i].core;
        assert!(core.queued() <= self.timers.queue, "queue over its bound");
        assert!(
            core.in_flight() <= self.timers.batch_max,
            "batch over its bound"
        );
        // Every request ends: behind the batches queued before it (each
        // answered or timed out within the market timeout), then its own.
        let batches = (self.timers.queue / self.timers.batch_max + 1) as u64;
        let bound = batches * self.timers.market_timeout.as_millis() as u64 + 2 * MAX_DELAY_MS;
        for (token, a) in self.asked.iter().filter(|(_, a)| a.link == i) {
            let age = self.t - a.at;
            assert!(
                age <= bound,
                "request {token} outstanding for {age} ms (bound {bound})"
            );
        }
    }

    fn step(&mut self) {
        self.stats.steps += 1;
        match self.rng.random_range(0..100) {
            0..55 => {
                let i = self.rng.random_range(0..self.links.len());
                for _ in 0..self.rng.random_range(1..=6) {
                    self.ask(i);
                }
            }
            55..62 if !self.calm => self.fault(),
            _ => self.t += self.rng.random_range(1..=25),
        }
        for m in 0..MARKETS {
            if !self.markets[m].alive && self.t >= self.markets[m].back_at {
                self.markets[m].alive = true;
            }
        }
        self.serve();
        for i in 0..self.links.len() {
            self.drive(i);
        }
        self.terminals();
    }

    /// Faults stop; every request still outstanding must end.
    fn settle(&mut self) {
        if let Some(b) = &mut self.broker {
            b.settling = true;
        }
        for m in &mut self.markets {
            m.alive = true;
            m.silent_until = 0;
        }
        for _ in 0..2_000 {
            let busy = self.broker.as_ref().map_or(0, Broker::busy);
            if self.asked.is_empty() && busy == 0 {
                return;
            }
            self.t += 10;
            self.serve();
            for i in 0..self.links.len() {
                self.drive(i);
            }
            self.terminals();
        }
        panic!("{} requests never ended", self.asked.len());
    }
}

fn action_kind(a: &Action) -> String {
    match a {
        Action::Send(b) => format!("send {}", b.len()),
        other => format!("{other:?}")
            .split_whitespace()
            .next()
            .unwrap_or("")
            .into(),
    }
}

fn link_world(seed: u64) -> LinkStats {
    let mut w = LinkWorld::new(seed);
    for _ in 0..STEPS {
        w.step();
    }
    w.settle();
    w.stats.sim_ms = w.t;
    w.stats.hash = std::mem::replace(&mut w.trace, Trace::new()).hash();
    w.stats
}

#[test]
fn link() {
    run_seeds("link", seeds(CI_SEEDS, LINK_REGRESSIONS), link_world);
}

#[test]
fn link_trace_depends_only_on_the_seed() {
    for seed in [1, 7] {
        let (a, b) = (link_world(seed), link_world(seed));
        assert_eq!(a.hash, b.hash, "seed {seed}");
        assert!(a.accepted > 0 && a.failed > 0, "{a:?}");
    }
    assert_ne!(link_world(1).hash, link_world(2).hash);
}

// -------------------------------------------------------------- broker --
//
// Terminals on the links above: each one's connection core
// (`proto::conn`, with its access session), its exchanges as
// `exchange::flow::Flow`s, a key
// holder that fails now and then, and markets that check the signature
// over T and derive X as a real market does. The check: the X a terminal
// ends up with (unwrapped under its own X'wrap, or derived itself in
// partial mode) is the X the market made for that session id and user,
// and no other terminal's X'wrap opens it.

const TERMINALS: usize = 8;

fn sha(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .unwrap()
}

/// The card, failing a signature when told: for a KeygenSign, after its
/// ephemeral was made, so the job must destroy it.
struct Flaky<'a> {
    card: &'a SoftCard,
    fail_sign: bool,
}

impl KeyOps for Flaky<'_> {
    type Key = usize;
    type Private = u64;
    type Error = SoftCardError;
    fn sign_digest(&self, key: usize, digest: &[u8; 32]) -> Result<Vec<u8>, SoftCardError> {
        if self.fail_sign {
            return Err(SoftCardError::UnknownKey(key));
        }
        self.card.sign_digest(key, digest)
    }
    fn generate_ephemeral(&self) -> Result<(Point, u64), SoftCardError> {
        self.card.generate_ephemeral()
    }
    fn derive_x(
        &self,
        private: u64,
        peer: &Point,
        input: &[u8],
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, SoftCardError> {
        self.card.derive_x(private, peer, input)
    }
    fn destroy(&self, private: u64) {
        self.card.destroy(private)
    }
}

/// What a terminal's session asked for and has not been answered.
enum Pending {
    Login(LoginCheck, bool),
    Release(ReleaseCheck, bool),
    Exchange(Box<InExchange>),
}

struct InExchange {
    req: Request,
    flow: Flow<u64>,
    link: usize,
    /// The request on the link, once submitted.
    token: Option<u64>,
    reply: Option<Result<Accepted, Failure>>,
    /// Partial mode: the terminal's own ephemeral.
    partial: Option<Ephemeral>,
    /// A retry's Binding action waiting for the link to drop the broken
    /// channel (as `Link::binding_after` waits).
    stalled: Option<[u8; 32]>,
    /// kx=hsm ephemerals the card made for this exchange: a broker core's
    /// restart loses them with its HSM session.
    privates: Vec<u64>,
}

/// The terminal connections' timers: an idle terminal is cut after
/// 15 s of silence (a clock jump does it), a stalled frame after 2 s.
const CONN_TIMEOUTS: Timeouts = Timeouts {
    idle: Duration::from_secs(15),
    frame: Duration::from_secs(2),
};

struct Term {
    user: String,
    /// X'wrap of this connection (a new one per connection).
    wrap: [u8; 32],
    /// Its released key is the card's key number: the terminal's index.
    conn: ConnCore<usize>,
    pending: Option<Pending>,
    next_id: u32,
    /// Ids sent on this connection and not yet answered, in order.
    unanswered: VecDeque<u32>,
    /// What the terminal meant by each frame not yet taken up: whether its
    /// password is right, and its own ephemeral in partial mode.
    intents: BTreeMap<u32, (bool, Option<Ephemeral>)>,
    /// Bytes written but not yet delivered (frames cut in pieces).
    unsent: Vec<u8>,
    /// The rest of a cut frame never comes (slowloris).
    stalled: bool,
    /// The read deadline the connection last asked for.
    until: Option<Instant>,
    /// Exchanges that gave this terminal its X.
    ok: u64,
}

fn conn() -> ConnCore<usize> {
    ConnCore::new([0; 32], 1 << 16, CONN_TIMEOUTS)
}

/// The frames in what the broker sent.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut d = FrameDecoder::new(1 << 16);
    d.push(bytes);
    let mut v = Vec::new();
    while let Some(f) = d.next_frame().expect("the broker sends whole frames") {
        v.push(f);
    }
    assert_eq!(d.pending(), 0, "the broker sent part of a frame");
    v
}

struct Broker {
    terms: Vec<Term>,
    /// The home card: every user's key, and the kx=hsm ephemerals.
    card: SoftCard,
    by_token: BTreeMap<u64, usize>,
    /// The X each market issued, by session id: (user, X).
    issued: BTreeMap<[u8; 16], (String, [u8; 32])>,
    settling: bool,
    exchanges_ok: u64,
    exchanges_failed: u64,
    reconnects: u64,
    /// Connections ended by the broker's timers, and by revocation.
    timeouts: u64,
    revoked: u64,
}

impl Broker {
    fn new(rng: &mut StdRng) -> Self {
        let terms = (0..TERMINALS)
            .map(|k| Term {
                user: format!("t{k}"),
                wrap: rng.random(),
                conn: conn(),
                pending: None,
                next_id: 1,
                unanswered: VecDeque::new(),
                intents: BTreeMap::new(),
                unsent: Vec::new(),
                stalled: false,
                until: None,
                ok: 0,
            })
            .collect();
        Self {
            terms,
            card: SoftCard::new(rng.random(), TERMINALS),
            by_token: BTreeMap::new(),
            issued: BTreeMap::new(),
            settling: false,
            exchanges_ok: 0,
            exchanges_failed: 0,
            reconnects: 0,
            timeouts: 0,
            revoked: 0,
        }
    }

    fn busy(&self) -> usize {
        self.terms.iter().filter(|t| t.pending.is_some()).count()
    }

    /// The market's side: T rebuilt from the request and the channel, the
    /// card's signature checked, X derived and remembered.
    fn answer(
        &mut self,
        m: usize,
        binding: [u8; 32],
        r: &ExchangeRequest,
    ) -> Result<Accepted, ErrorCode> {
        let Some(k) = self.terms.iter().position(|t| t.user == r.user) else {
            return market_answer(m, r.request_id, &r.user);
        };
        let t = Transcript {
            mode: r.mode,
            market: format!("m{m}"),
            user: r.user.clone(),
            cert_fingerprint: sha(&r.user_cert),
            request_id: r.request_id,
            ephemeral: r.ephemeral,
            time_ms: r.time_ms,
            nonce: r.nonce,
            binding,
        };
        let digest = t.digest();
        if !verify_signature(&self.card.public(k), &t.preimage(), &r.signature) {
            return Err(ErrorCode::BadSignature);
        }
        let seed = sha(format!("market {m} eph {}", r.request_id).as_bytes());
        // The market answers in the group the broker chose (kx=hsm: P-256).
        let eph = Ephemeral::from_private_bytes_for_vectors(r.ephemeral.group(), &seed)
            .expect("a valid scalar");
        let x = eph
            .x(&r.ephemeral, &digest, &eph.public)
            .ok_or(ErrorCode::Malformed)?;
        let mut session_id = [0; 16];
        session_id.copy_from_slice(&sha(format!("{m}/{}", r.request_id).as_bytes())[..16]);
        self.issued.insert(session_id, (r.user.clone(), *x));
        Ok(Accepted {
            session_id,
            ephemeral: eph.public,
            expiry_ms: r.request_id,
            endpoint: format!("m{m}"),
        })
    }

    /// A link answered `token`; true if it was a terminal's.
    fn replied(&mut self, token: u64, r: &Result<Accepted, Failure>) -> bool {
        let Some(k) = self.by_token.remove(&token) else {
            return false;
        };
        if let Some(Pending::Exchange(x)) = &mut self.terms[k].pending {
            x.reply = Some(r.clone());
        }
        true
    }

    /// The core holding `token` restarted: the terminal's connection went
    /// with it.
    fn lost(&mut self, token: u64) {
        if let Some(k) = self.by_token.remove(&token) {
            if let Some(Pending::Exchange(x)) = &self.terms[k].pending {
                for p in &x.privates {
                    self.card.destroy(*p);
                }
            }
            self.reconnect(k);
        }
    }

    fn reconnect(&mut self, k: usize) {
        self.reconnects += 1;
        let t = &mut self.terms[k];
        t.conn = conn();
        t.pending = None;
        t.unanswered.clear();
        t.intents.clear();
        t.unsent.clear();
        t.stalled = false;
        t.until = None;
        t.wrap = sha(&t.wrap);
    }
}

impl LinkWorld {
    fn broker_new(seed: u64) -> Self {
        let mut w = Self::new(seed);
        w.broker = Some(Broker::new(&mut w.rng));
        w
    }

    fn terminals(&mut self) {
        let Some(mut b) = self.broker.take() else {
            return;
        };
        for k in 0..b.terms.len() {
            self.terminal(&mut b, k);
        }
        self.broker = Some(b);
    }

    /// One terminal's turn: its read deadline, what its connection asked
    /// for, and the frames it writes.
    fn terminal(&mut self, b: &mut Broker, k: usize) {
        let now = self.now();
        if b.terms[k].until.is_some_and(|u| now >= u) {
            b.terms[k].conn.handle_timeout(now);
            self.drive_conn(b, k);
        }
        match b.terms[k].pending.take() {
            Some(Pending::Login(check, right)) => {
                let r = if right {
                    Ok(())
                } else {
                    Err(ErrorCode::WrongPassword.into())
                };
                b.terms[k].conn.login_done(check, r);
                self.drive_conn(b, k);
            }
            Some(Pending::Release(check, right)) => {
                let r = match (right, self.rng.random_bool(0.03) && !self.calm) {
                    (false, _) => Err(ErrorCode::WrongPassword.into()),
                    (true, true) => Err(ErrorCode::HsmUnavailable.into()),
                    (true, false) => Ok(k),
                };
                b.terms[k].conn.release_done(check, r);
                self.drive_conn(b, k);
            }
            Some(Pending::Exchange(x)) => self.exchange_step(b, k, x),
            None => {
                if !b.settling {
                    self.send(b, k);
                }
                self.deliver(b, k);
            }
        }
    }

    /// The terminal writes a frame, now and then behind a ping in one burst.
    fn send(&mut self, b: &mut Broker, k: usize) {
        if !self.chance(0.3) {
            return;
        }
        if !self.calm && self.chance(0.004) {
            // Revoked (and, for the simulation, enrolled again at once).
            b.terms[k].conn.handle_revoked();
            return self.drive_conn(b, k);
        }
        let burst = self.chance(0.15);
        let right = !self.rng.random_bool(0.1);
        let market = self.rng.random_range(0..MARKETS);
        let partial = self.rng.random_bool(0.3);
        let t = &mut b.terms[k];
        let pw = |r: bool| {
            Password::new(if r {
                b"right".to_vec()
            } else {
                b"wrong".to_vec()
            })
        };
        let mut eph = None;
        // What the terminal knows of its session; a pipelined frame may
        // find it changed, and is answered for the state it finds.
        let msg = match (t.conn.user(), t.conn.is_released()) {
            (None, _) => Message::Login {
                user: t.user.clone(),
                password: pw(right),
            },
            (Some(_), false) => Message::Release {
                password: pw(right),
            },
            _ if self.rng.random_bool(0.02) => Message::Logout,
            _ if partial => {
                let e = Ephemeral::from_private_bytes_for_vectors(
                    Group::X25519,
                    &self.rng.random::<[u8; 32]>(),
                )
                .unwrap();
                let msg = Message::ExchangePartial {
                    market: format!("m{market}"),
                    ephemeral: e.public,
                };
                eph = Some(e);
                msg
            }
            _ => Message::Exchange {
                market: format!("m{market}"),
            },
        };
        let mut out = Vec::new();
        if burst {
            encode(
                &Frame {
                    id: t.next_id,
                    msg: Message::Ping,
                },
                &mut out,
            );
            t.unanswered.push_back(t.next_id);
            t.next_id += 1;
        }
        let id = t.next_id;
        t.next_id += 1;
        encode(&Frame { id, msg }, &mut out);
        t.unanswered.push_back(id);
        t.intents.insert(id, (right, eph));
        t.unsent.extend_from_slice(&out);
    }

    /// Delivers what the terminal wrote: all of it, or (with faults) up to a
    /// random cut, the rest later or, stalled, never.
    fn deliver(&mut self, b: &mut Broker, k: usize) {
        let t = &b.terms[k];
        if t.unsent.is_empty() || t.stalled {
            return;
        }
        let cut = if !self.calm && self.chance(0.2) {
            self.rng.random_range(1..=t.unsent.len())
        } else {
            t.unsent.len()
        };
        let stall = cut < t.unsent.len() && self.chance(0.05);
        let t = &mut b.terms[k];
        let bytes: Vec<u8> = t.unsent.drain(..cut).collect();
        t.stalled = stall;
        t.until = None;
        t.conn.handle_bytes(&bytes);
        self.drive_conn(b, k);
    }

    /// Does what the connection's core asks until it waits.
    fn drive_conn(&mut self, b: &mut Broker, k: usize) {
        loop {
            let now = self.now();
            let a = b.terms[k].conn.poll_action(now);
            while let Some(ConnEvent::Refused { id, code, .. }) = b.terms[k].conn.poll_event() {
                self.trace.note(("refused", k, id, code));
            }
            match a {
                ConnAction::Work(w) => return self.work(b, k, w),
                ConnAction::Send => {
                    let f = frames(b.terms[k].conn.out());
                    b.terms[k].conn.sent();
                    self.answers(b, k, f, false);
                }
                ConnAction::Close => {
                    let f = frames(b.terms[k].conn.out());
                    b.terms[k].conn.sent();
                    self.answers(b, k, f, true);
                    assert!(b.terms[k].pending.is_none(), "closed with a check out");
                    return b.reconnect(k);
                }
                ConnAction::Read { until } => {
                    b.terms[k].until = Some(until);
                    return;
                }
                ConnAction::Wait => panic!("the connection waits with nothing out"),
            }
        }
    }

    /// The broker's answers: each frame answered once, in order; the last
    /// one before a close says why.
    fn answers(&mut self, b: &mut Broker, k: usize, frames: Vec<Frame>, closing: bool) {
        for f in &frames {
            self.trace.note(("frame", k, f.id, f.msg.type_byte()));
            if let Message::Error { code, .. } = &f.msg {
                match code {
                    ErrorCode::Timeout => b.timeouts += 1,
                    ErrorCode::TerminalRevoked => b.revoked += 1,
                    _ => {}
                }
            }
            if f.id == 0 {
                assert!(
                    matches!(
                        f.msg,
                        Message::Error {
                            code: ErrorCode::Timeout | ErrorCode::TerminalRevoked,
                            ..
                        }
                    ),
                    "id 0 answered {:?}",
                    f.msg
                );
                continue;
            }
            assert_eq!(
                b.terms[k].unanswered.pop_front(),
                Some(f.id),
                "frames answered out of order, twice, or unasked"
            );
        }
        if closing {
            let last = frames.last().expect("a close says why");
            assert!(
                matches!(last.msg, Message::Bye | Message::Error { .. }),
                "closed after {:?}",
                last.msg
            );
        }
    }

    /// A check or request the connection handed out.
    fn work(&mut self, b: &mut Broker, k: usize, w: Work) {
        let t = &mut b.terms[k];
        let id = match &w {
            Work::CheckLogin { check, .. } => check.id(),
            Work::CheckRelease { check, .. } => check.id(),
            Work::Exchange { req, .. } | Work::Wallet { req, .. } => req.id(),
        };
        let (right, partial) = t.intents.remove(&id).expect("work for a frame never sent");
        match w {
            Work::CheckLogin { check, .. } => {
                assert_eq!(check.user(), t.user);
                t.pending = Some(Pending::Login(check, right));
            }
            Work::CheckRelease { check, .. } => t.pending = Some(Pending::Release(check, right)),
            Work::Exchange {
                req,
                market,
                ephemeral,
            } => {
                assert!(t.conn.is_released(), "an exchange without the release");
                let m: usize = market[1..].parse().unwrap();
                let link = (k % CORES) * MARKETS + m;
                let kx = if self.rng.random_bool(0.5) {
                    Kx::Hsm
                } else {
                    Kx::Software
                };
                let flow = Flow::new(Params {
                    user: t.user.clone(),
                    market,
                    cert: Arc::new(t.user.as_bytes().to_vec()),
                    fingerprint: sha(t.user.as_bytes()),
                    kx,
                    terminal_eph: ephemeral,
                    wrap_key: zeroize::Zeroizing::new(t.wrap),
                });
                t.pending = Some(Pending::Exchange(Box::new(InExchange {
                    req,
                    flow,
                    link,
                    token: None,
                    reply: None,
                    partial,
                    stalled: None,
                    privates: Vec::new(),
                })));
            }
            Work::Wallet { .. } => panic!("the simulated terminals make no wallet calls"),
        }
    }

    /// Carries the flow's actions out until it waits for the link.
    fn exchange_step(&mut self, b: &mut Broker, k: usize, mut x: Box<InExchange>) {
        if let Some(r) = x.reply.take() {
            x.token = None;
            x.flow.handle_reply(r);
        } else if x.token.is_some() {
            b.terms[k].pending = Some(Pending::Exchange(x));
            return;
        }
        let mut next = x
            .stalled
            .take()
            .map(|after| FlowAction::Binding { after: Some(after) });
        while let Some(a) = next.take().or_else(|| x.flow.poll_action()) {
            match a {
                FlowAction::Binding { after } => {
                    let now = self.links[x.link].core.binding();
                    // As `Link::binding_after`: wait while the link still
                    // holds the broken channel.
                    if after.is_some() && now == after {
                        x.stalled = after;
                        break;
                    }
                    let fresh = Fresh {
                        request_id: self.next_request,
                        nonce: self.rng.random(),
                        time_ms: self.t,
                        software: Ephemeral::from_private_bytes_for_vectors(
                            Group::X25519,
                            &self.rng.random::<[u8; 32]>(),
                        ),
                    };
                    self.next_request += 1;
                    x.flow.handle_binding(now.map(|b| (b, fresh)));
                }
                FlowAction::Key(job) => {
                    let faulty = !self.calm && self.chance(0.04);
                    let card = Flaky {
                        card: &b.card,
                        fail_sign: faulty && self.chance(0.5),
                    };
                    let key = *b.terms[k]
                        .conn
                        .released()
                        .expect("a job for a released key");
                    if faulty && !card.fail_sign {
                        // The HSM queue was full: the job never ran.
                        x.flow.handle_key_refused(ErrorCode::Busy);
                        continue;
                    }
                    let r = job.run(&card, key).map_err(|_| ErrorCode::HsmUnavailable);
                    if let Ok(KeyDone::KeygenSigned { private, .. }) = &r {
                        x.privates.push(*private);
                    }
                    x.flow.handle_key(r);
                }
                FlowAction::Submit { req, binding } => {
                    let token = self.next_token;
                    self.next_token += 1;
                    self.asked.insert(
                        token,
                        Asked {
                            link: x.link,
                            request_id: req.request_id,
                            user: req.user.clone(),
                            at: self.t,
                        },
                    );
                    b.by_token.insert(token, k);
                    x.token = Some(token);
                    let now = self.now();
                    // The link answers some at once (a stale binding, a full
                    // queue): its events are drained with the link's next.
                    self.links[x.link]
                        .core
                        .handle_submit(now, req, binding, token);
                    b.terms[k].pending = Some(Pending::Exchange(x));
                    return;
                }
                FlowAction::Destroy(p) => b.card.destroy(p),
                FlowAction::Done(r, _) => {
                    self.check_exchange(b, k, &x, &r);
                    b.terms[k]
                        .conn
                        .request_done(x.req, r.map_err(Refused::from));
                    return self.drive_conn(b, k);
                }
            }
        }
        b.terms[k].pending = Some(Pending::Exchange(x));
    }

    fn check_exchange(
        &mut self,
        b: &mut Broker,
        k: usize,
        x: &InExchange,
        r: &Result<Message, ErrorCode>,
    ) {
        let me = &b.terms[k];
        let (session_id, got) = match r {
            Ok(Message::ExchangeOk {
                session_id,
                wrapped_x,
                ..
            }) => {
                let x = keybroker::exchange::unwrap(&me.wrap, wrapped_x)
                    .expect("the terminal's own X'wrap opens its X");
                for other in b.terms.iter().filter(|o| o.user != me.user) {
                    assert!(
                        keybroker::exchange::unwrap(&other.wrap, wrapped_x).is_none(),
                        "another terminal's X'wrap opens X"
                    );
                }
                (*session_id, *x)
            }
            Ok(Message::PartialOk {
                session_id,
                market_ephemeral,
                transcript,
                ..
            }) => {
                let e = x
                    .partial
                    .as_ref()
                    .expect("partial answer to a full exchange");
                let x = e.x(market_ephemeral, transcript, market_ephemeral).unwrap();
                (*session_id, *x)
            }
            Ok(other) => panic!("an exchange answered {other:?}"),
            Err(c) => {
                assert!(
                    matches!(
                        c,
                        ErrorCode::MarketUnavailable
                            | ErrorCode::MarketTimeout
                            | ErrorCode::Busy
                            | ErrorCode::HsmUnavailable
                    ),
                    "exchange failed with {c:?}"
                );
                b.exchanges_failed += 1;
                self.trace.note(("exchange", k, c));
                return;
            }
        };
        let issued = b
            .issued
            .get(&session_id)
            .expect("a session the market never issued");
        assert_eq!(
            issued,
            &(me.user.clone(), got),
            "X went to a session that did not ask for it"
        );
        b.exchanges_ok += 1;
        b.terms[k].ok += 1;
        self.trace.note(("exchange", k, "ok", session_id));
    }
}

#[derive(Debug)]
struct BrokerStats {
    link: LinkStats,
    exchanges_ok: u64,
    exchanges_failed: u64,
    reconnects: u64,
    timeouts: u64,
    revoked: u64,
}

fn broker_world(seed: u64) -> BrokerStats {
    let mut w = LinkWorld::broker_new(seed);
    for _ in 0..STEPS / 2 {
        w.step();
    }
    w.settle();
    let b = w.broker.as_ref().unwrap();
    assert_eq!(b.busy(), 0, "a terminal's request never ended");
    // Every kx=hsm ephemeral was derived from or destroyed.
    assert_eq!(b.card.live(), 0, "HSM ephemerals leaked");
    // Once the faults stop, every terminal brokers a key again.
    w.calm = true;
    let b = w.broker.as_mut().unwrap();
    b.settling = false;
    let before: Vec<u64> = b.terms.iter().map(|t| t.ok).collect();
    let healed = (0..5_000).any(|_| {
        w.step();
        let b = w.broker.as_ref().unwrap();
        b.terms.iter().zip(&before).all(|(t, n)| t.ok > *n)
    });
    let b = w.broker.take().unwrap();
    let stuck: Vec<_> = b
        .terms
        .iter()
        .zip(&before)
        .filter(|(t, n)| t.ok == **n)
        .map(|(t, _)| &t.user)
        .collect();
    assert!(
        healed,
        "after the faults stopped, {stuck:?} brokered no key"
    );
    w.stats.sim_ms = w.t;
    w.stats.hash = std::mem::replace(&mut w.trace, Trace::new()).hash();
    BrokerStats {
        link: std::mem::take(&mut w.stats),
        exchanges_ok: b.exchanges_ok,
        exchanges_failed: b.exchanges_failed,
        reconnects: b.reconnects,
        timeouts: b.timeouts,
        revoked: b.revoked,
    }
}

#[test]
fn broker() {
    run_seeds(
        "broker",
        seeds(BROKER_CI_SEEDS, BROKER_REGRESSIONS),
        broker_world,
    );
}

#[test]
fn broker_trace_depends_only_on_the_seed() {
    let (a, b) = (broker_world(5), broker_world(5));
    assert_eq!(a.link.hash, b.link.hash);
    assert!(
        a.exchanges_ok > 0
            && a.exchanges_failed > 0
            && a.reconnects > 0
            && a.timeouts > 0
            && a.revoked > 0,
        "{a:?}"
    );
}

// -------------------------------------------------------------- wallet --

/// Which write of the next operation fails, and how.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Fault {
    #[default]
    None,
    /// The entry's INSERT fails (a full disk).
    Insert,
    /// The commit fails and nothing is written.
    CommitLost,
    /// The commit lands, but the writer is told it failed: the client gets
    /// an error for an operation that happened.
    AckLost,
    /// The chain MAC fails (the HSM is gone).
    Mac,
}

#[derive(Default)]
struct Faults {
    next: Mutex<Fault>,
    mac_down: AtomicBool,
}

struct FaultStore {
    inner: SqliteStore,
    faults: Arc<Faults>,
}

impl FaultStore {
    fn fault(&self) -> Fault {
        *self.faults.next.lock().unwrap()
    }
}

fn sim_err(what: &str) -> WalletError {
    WalletError::storage(format!("sim: {what}"))
}

impl Store for FaultStore {
    fn begin_write(&mut self) -> WalletResult<()> {
        self.inner.begin_write()
    }
    fn commit(&mut self) -> WalletResult<()> {
        match self.fault() {
            Fault::CommitLost => Err(sim_err("commit failed")),
            Fault::AckLost => {
                self.inner.commit()?;
                Err(sim_err("acknowledgement lost"))
            }
            _ => self.inner.commit(),
        }
    }
    fn rollback(&mut self) -> WalletResult<()> {
        self.inner.rollback()
    }
    fn head(&mut self) -> WalletResult<Option<(i64, Vec<u8>)>> {
        self.inner.head()
    }
    fn mac_at(&mut self, seq: i64) -> WalletResult<Option<Vec<u8>>> {
        self.inner.mac_at(seq)
    }
    fn balance_of(&mut self, user: &str, currency: &str) -> WalletResult<i64> {
        self.inner.balance_of(user, currency)
    }
    fn set_balance(&mut self, user: &str, currency: &str, balance: i64) -> WalletResult<()> {
        self.inner.set_balance(user, currency, balance)
    }
    fn insert_entry(&mut self, e: &Entry) -> WalletResult<()> {
        if self.fault() == Fault::Insert {
            return Err(sim_err("disk full"));
        }
        self.inner.insert_entry(e)
    }
    fn queue_mail(&mut self, m: &NewMail<'_>) -> WalletResult<()> {
        self.inner.queue_mail(m)
    }
    fn outbox_update(&mut self, u: &keybroker::wallet::mailer::OutboxUpdate) -> WalletResult<()> {
        self.inner.outbox_update(u)
    }
    fn decision_by_key(&mut self, user: &str, key: &str) -> WalletResult<Option<KeyedDecision>> {
        self.inner.decision_by_key(user, key)
    }
    fn decision_by_id(&mut self, id: &str) -> WalletResult<Option<DecisionRow>> {
        self.inner.decision_by_id(id)
    }
    fn insert_decision(&mut self, d: &Decision, idempotency_key: &str) -> WalletResult<()> {
        self.inner.insert_decision(d, idempotency_key)
    }
    fn mark_cancelled(&mut self, id: &str) -> WalletResult<()> {
        self.inner.mark_cancelled(id)
    }
    fn voucher_used(&mut self, voucher_id: &str) -> WalletResult<bool> {
        self.inner.voucher_used(voucher_id)
    }
    fn insert_voucher(&mut self, voucher_id: &str, seq: i64) -> WalletResult<()> {
        self.inner.insert_voucher(voucher_id, seq)
    }
    fn scan(&mut self, sink: &mut dyn FnMut(Scanned) -> WalletResult<()>) -> WalletResult<()> {
        self.inner.scan(sink)
    }
    fn balances(&mut self, user: &str) -> WalletResult<Vec<(String, i64)>> {
        self.inner.balances(user)
    }
    fn history(&mut self, user: &str) -> WalletResult<Vec<Result<Entry, String>>> {
        self.inner.history(user)
    }
}

/// The chain MAC in software, failing while the "HSM" is down.
struct FaultMac {
    inner: SoftChainMac,
    faults: Arc<Faults>,
}

impl ChainMac for FaultMac {
    fn mac(&self, day: i64, data: &[u8]) -> WalletResult<[u8; 32]> {
        if self.faults.mac_down.load(Ordering::SeqCst) {
            return Err(WalletError::mac("sim: HSM gone"));
        }
        self.inner.mac(day, data)
    }
    fn anchor_mac(&self, data: &[u8]) -> WalletResult<[u8; 32]> {
        self.inner.anchor_mac(data)
    }
}

const USERS: usize = 4;
const WALLET_STEPS: u64 = 150;

/// What the simulation asked for, by the key that makes it once-only.
#[derive(Default)]
struct Asks {
    /// (user, idempotency key) → amount.
    purchases: BTreeMap<(String, String), i64>,
    /// voucher id → (user, amount).
    top_ups: BTreeMap<String, (String, i64)>,
    /// Decisions each user has seen (from a purchase's answer).
    decisions: Vec<Decision>,
    /// Operations acknowledged: their entries must exist from then on.
    acked_purchases: BTreeMap<String, i64>,
    acked_top_ups: BTreeSet<String>,
    acked_cancels: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct WalletStats {
    ops: u64,
    faults: u64,
    crashes: u64,
    jumps: u64,
    entries: u64,
    hash: String,
}

struct WalletWorld {
    rng: StdRng,
    /// The ledger's clock, ms since the epoch.
    clock: Arc<ManualClock>,
    t_ms: u64,
    dir: std::path::PathBuf,
    faults: Arc<Faults>,
    ledger: Option<GroupLedger<FaultStore>>,
    asks: Asks,
    trace: Trace,
    stats: WalletStats,
}

fn user(i: usize) -> String {
    format!("u{i}")
}

fn eur(minor: i64) -> Amount {
    Amount::new(minor, "EUR").unwrap()
}

impl WalletWorld {
    fn new(seed: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("kb-sim-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // 2026-12-04, so day keys and decision ids look as they will.
        let t_ms = 1_796_342_400_000;
        let mut w = Self {
            rng: StdRng::seed_from_u64(seed),
            clock: Arc::new(ManualClock::at(Duration::from_millis(t_ms))),
            t_ms,
            dir,
            faults: Arc::default(),
            ledger: None,
            asks: Asks::default(),
            trace: Trace::new(),
            stats: WalletStats::default(),
        };
        w.open();
        w
    }

    fn open(&mut self) {
        let path = self.dir.join("ledger.db");
        let (f1, f2) = (self.faults.clone(), self.faults.clone());
        let mac = Box::new(move || {
            Ok(Box::new(FaultMac {
                inner: SoftChainMac::new(b"sim chain key, 32 bytes long....."),
                faults: f1,
            }) as Box<dyn ChainMac>)
        });
        let open = move || {
            Ok(FaultStore {
                inner: SqliteStore::open(&path)?,
                faults: f2.clone(),
            })
        };
        // The head is anchored after every group (interval zero), so the
        // anchors are as deterministic as the rest.
        let mut anchor = AnchorConfig::new(self.dir.join("anchors"));
        anchor.interval = Duration::ZERO;
        let cfg = LedgerConfig {
            clock: self.clock.clone(),
            anchor: Some(anchor),
            ..LedgerConfig::default()
        };
        self.ledger = Some(GroupLedger::start(cfg, mac, open).unwrap());
    }

    fn ledger(&self) -> &GroupLedger<FaultStore> {
        self.ledger.as_ref().unwrap()
    }

    /// A crash: the ledger goes, with whatever it held in memory, and is
    /// opened again from its file.
    fn crash(&mut self) {
        self.stats.crashes += 1;
        self.ledger = None;
        self.open();
        let audit = self.ledger().audit().unwrap();
        assert!(audit.ok, "audit after a restart: {:?}", audit.problems);
    }

    fn with_fault<T>(&mut self, op: impl FnOnce(&GroupLedger<FaultStore>) -> T) -> (Fault, T) {
        let fault = if self.rng.random_bool(0.2) {
            self.stats.faults += 1;
            match self.rng.random_range(0..4) {
                0 => Fault::Insert,
                1 => Fault::CommitLost,
                2 => Fault::AckLost,
                _ => Fault::Mac,
            }
        } else {
            Fault::None
        };
        *self.faults.next.lock().unwrap() = fault;
        self.faults
            .mac_down
            .store(fault == Fault::Mac, Ordering::SeqCst);
        let r = op(self.ledger());
        *self.faults.next.lock().unwrap() = Fault::None;
        self.faults.mac_down.store(false, Ordering::SeqCst);
        (fault, r)
    }

    /// With probability `p`, one of the `earlier` (key, amount) pairs again,
    /// as a client that lost the answer would send it; else `fresh` with an
    /// amount from `amounts`. True if it is a retry.
    fn again_or(
        &mut self,
        earlier: Vec<(String, i64)>,
        p: f64,
        fresh: String,
        amounts: std::ops::RangeInclusive<i64>,
    ) -> (bool, String, i64) {
        if !earlier.is_empty() && self.rng.random_bool(p) {
            let (k, a) = earlier[self.rng.random_range(0..earlier.len())].clone();
            return (true, k, a);
        }
        (false, fresh, self.rng.random_range(amounts))
    }

    fn purchase(&mut self) {
        let u = self.rng.random_range(0..USERS);
        let earlier: Vec<_> = self
            .asks
            .purchases
            .iter()
            .filter(|((pu, _), _)| *pu == user(u))
            .map(|((_, k), a)| (k.clone(), *a))
            .collect();
        let key = format!("k{}", self.stats.ops);
        let (retry, key, amount) = self.again_or(earlier, 0.3, key, 1..=400);
        if !retry {
            self.asks.purchases.insert((user(u), key.clone()), amount);
        }
        let req = PurchaseRequest {
            user: user(u),
            market: "m1".into(),
            amount: eur(amount),
            order_ref: format!("order {key}"),
            idempotency_key: key.clone(),
            mail_to: format!("{}@example.org", user(u)),
        };
        let (fault, r) = self.with_fault(|l| l.purchase(req));
        match &r {
            Ok(d) => {
                if let Some(&first) = self.asks.acked_purchases.get(&d.id) {
                    assert_eq!(first, amount, "a retry changed the decision");
                }
                assert_eq!(d.amount, eur(amount));
                self.asks.acked_purchases.insert(d.id.clone(), amount);
                if !self.asks.decisions.iter().any(|x| x.id == d.id) {
                    self.asks.decisions.push(d.clone());
                }
            }
            // The retry of a purchase since refunded: no second debit.
            Err(WalletError::AlreadyCancelled) => assert!(retry),
            Err(e) => self.refused(fault, e),
        }
        self.trace
            .note(("purchase", u, amount, fault, r.map(|d| d.balance_after)));
    }

    fn top_up(&mut self) {
        let u = self.rng.random_range(0..USERS);
        let earlier: Vec<_> = self
            .asks
            .top_ups
            .iter()
            .filter(|(_, (vu, _))| *vu == user(u))
            .map(|(v, (_, a))| (v.clone(), *a))
            .collect();
        let fresh = format!("{:032x}", self.rng.random::<u128>());
        let (retry, voucher, amount) = self.again_or(earlier, 0.2, fresh, 100..=1_000);
        if !retry {
            self.asks.top_ups.insert(voucher.clone(), (user(u), amount));
        }
        let req = TopUpRequest {
            user: user(u),
            amount: eur(amount),
            voucher_id: voucher.clone(),
            mail_to: format!("{}@example.org", user(u)),
        };
        let (fault, r) = self.with_fault(|l| l.top_up(req));
        match &r {
            Ok(_) => {
                assert!(
                    self.asks.acked_top_ups.insert(voucher),
                    "a voucher credited twice"
                );
            }
            Err(WalletError::VoucherUsed) => {}
            Err(e) => self.refused(fault, e),
        }
        self.trace
            .note(("top_up", u, amount, fault, r.map(|e| e.balance_after)));
    }

    fn cancel(&mut self) {
        if self.asks.decisions.is_empty() {
            return;
        }
        let d = self.asks.decisions[self.rng.random_range(0..self.asks.decisions.len())].clone();
        // Now and then by another user, or for another market.
        let who = if self.rng.random_bool(0.1) {
            user(self.rng.random_range(0..USERS))
        } else {
            d.user.clone()
        };
        let market = if self.rng.random_bool(0.05) {
            "m2"
        } else {
            "m1"
        };
        let req = CancelRequest {
            user: who.clone(),
            decision_id: d.id.clone(),
            mail_to: format!("{who}@example.org"),
            market: Some(market.into()),
        };
        let (fault, r) = self.with_fault(|l| l.cancel(req));
        match &r {
            Ok(e) => {
                assert_eq!(
                    (e.kind, e.amount, &e.user),
                    (EntryKind::Cancel, d.amount, &d.user)
                );
                assert!(
                    self.asks.acked_cancels.insert(d.id.clone()),
                    "a decision refunded twice"
                );
            }
            Err(WalletError::AlreadyCancelled) => {}
            Err(WalletError::NotYourDecision) => assert_ne!(who, d.user),
            Err(WalletError::BadAuthorisation) => assert_eq!(market, "m2"),
            Err(e) => self.refused(fault, e),
        }
        self.trace
            .note(("cancel", fault, r.map(|e| e.balance_after)));
    }

    /// An error is the fault injected, or a refusal the ledger may give.
    fn refused(&self, fault: Fault, e: &WalletError) {
        match e {
            WalletError::Storage(_) => {
                assert!(
                    matches!(fault, Fault::Insert | Fault::CommitLost | Fault::AckLost),
                    "{e}"
                )
            }
            WalletError::Mac(_) => assert_eq!(fault, Fault::Mac),
            WalletError::InsufficientFunds => {}
            other => panic!("unexpected refusal {other:?} (fault {fault:?})"),
        }
    }

    /// The ledger's entries against what was asked and acknowledged.
    fn check(&mut self) {
        let mut purchases = BTreeSet::new();
        let mut vouchers = BTreeSet::new();
        let mut cancels = BTreeMap::new();
        let mut debits = BTreeMap::new();
        let mut total = 0i64;
        let mut entries = 0;
        for u in 0..USERS {
            let mut sum = 0i64;
            for e in self.ledger().history(&user(u)).unwrap() {
                entries += 1;
                let amount = e.amount.minor;
                match e.kind {
                    EntryKind::Purchase => {
                        let asked = self
                            .asks
                            .purchases
                            .get(&(e.user.clone(), e.idempotency_key.clone()));
                        assert_eq!(asked, Some(&amount), "a debit nobody asked for: {e:?}");
                        assert!(
                            purchases.insert((e.user.clone(), e.idempotency_key.clone())),
                            "one idempotency key debited twice"
                        );
                        debits.insert(e.decision_id.clone(), (e.user.clone(), amount));
                        sum -= amount;
                    }
                    EntryKind::TopUp => {
                        let asked = self.asks.top_ups.get(&e.voucher_id);
                        assert_eq!(
                            asked,
                            Some(&(e.user.clone(), amount)),
                            "a credit nobody paid for: {e:?}"
                        );
                        assert!(
                            vouchers.insert(e.voucher_id.clone()),
                            "a voucher credited twice"
                        );
                        sum += amount;
                    }
                    EntryKind::Cancel => {
                        assert!(
                            cancels
                                .insert(e.decision_id.clone(), (e.user.clone(), amount))
                                .is_none(),
                            "a decision refunded twice"
                        );
                        sum += amount;
                    }
                }
                assert_eq!(
                    e.balance_after, sum,
                    "balance_after disagrees with the entries"
                );
                assert!(sum >= 0, "a balance went negative");
            }
            let balance = self
                .ledger()
                .balance(&user(u))
                .unwrap()
                .iter()
                .map(|a| a.minor)
                .sum::<i64>();
            assert_eq!(
                balance,
                sum,
                "{}'s balance is not the sum of the entries",
                user(u)
            );
            total += balance;
        }
        for (id, refund) in &cancels {
            assert_eq!(
                debits.get(id),
                Some(refund),
                "a refund of no debit, or of another amount"
            );
        }
        for (id, amount) in &self.asks.acked_purchases {
            assert!(
                debits.get(id).is_some_and(|(_, a)| a == amount),
                "acknowledged purchase {id} lost"
            );
        }
        for v in &self.asks.acked_top_ups {
            assert!(vouchers.contains(v), "acknowledged top-up {v} lost");
        }
        for id in &self.asks.acked_cancels {
            assert!(cancels.contains_key(id), "acknowledged cancel {id} lost");
        }
        // No money created or lost: what is held is what came in, less
        // what was spent, plus what was refunded.
        let inflow: i64 = vouchers.iter().map(|v| self.asks.top_ups[v].1).sum();
        let spent: i64 = debits.values().map(|(_, a)| a).sum();
        let refunded: i64 = cancels.values().map(|(_, a)| a).sum();
        assert_eq!(total, inflow - spent + refunded, "money created or lost");
        self.stats.entries = entries;
        self.trace.note(("check", entries, total));
    }

    /// Time passes; now and then the clock jumps, forward by hours to days
    /// (across day keys), or back by up to two hours (a clock corrected).
    fn tick(&mut self) {
        let r = self.rng.random_range(0..100);
        self.t_ms = match r {
            0..3 => self.t_ms + self.rng.random_range(3_600_000..3 * 86_400_000),
            3..5 => self.t_ms - self.rng.random_range(1..7_200_000),
            _ => self.t_ms + self.rng.random_range(1..500),
        };
        if r < 5 {
            self.stats.jumps += 1;
            self.trace.note(("clock", self.t_ms));
        }
        self.clock.set(Duration::from_millis(self.t_ms));
    }

    fn step(&mut self) {
        self.stats.ops += 1;
        self.tick();
        match self.rng.random_range(0..100) {
            0..30 => self.top_up(),
            30..75 => self.purchase(),
            75..92 => self.cancel(),
            _ => self.crash(),
        }
        self.check();
    }
}

impl Drop for WalletWorld {
    fn drop(&mut self) {
        self.ledger = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wallet_world(seed: u64) -> WalletStats {
    let mut w = WalletWorld::new(seed);
    for _ in 0..WALLET_STEPS {
        w.step();
    }
    w.crash();
    w.check();
    let audit = w.ledger().audit().unwrap();
    assert!(audit.ok, "{:?}", audit.problems);
    assert!(
        audit.anchors > 0 || w.stats.entries == 0,
        "nothing anchored"
    );
    w.stats.hash = std::mem::replace(&mut w.trace, Trace::new()).hash();
    std::mem::take(&mut w.stats)
}

#[test]
fn wallet() {
    run_seeds(
        "wallet",
        seeds(WALLET_CI_SEEDS, WALLET_REGRESSIONS),
        wallet_world,
    );
}

#[test]
fn wallet_trace_depends_only_on_the_seed() {
    let (a, b) = (wallet_world(3), wallet_world(3));
    assert_eq!(a.hash, b.hash);
    assert!(a.faults > 0 && a.crashes > 0 && a.entries > 0, "{a:?}");
}
