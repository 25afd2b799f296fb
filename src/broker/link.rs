//! One core's persistent connection to one market, with batching.
//!
//! ```text
//! exchanges ──try_send──► bounded queue ──► link task: first request, then more until
//!                                           batch_max or batch_delay ─► one frame ─► market
//! oneshot replies ◄── match by request id ◄── one reply frame ◄──────────────────┘
//! ```
//!
//! One batch is in flight at a time; requests arriving meanwhile form the
//! next one, so batches grow with load without waiting. `batch_delay_us`
//! (0 by default) makes a batch also wait that long for company. While the
//! market is down, new requests fail at once with `market_unavailable`; a
//! request whose channel broke after it was queued or sent answers
//! [`Failure::Broken`] (the exchange retries it once on the next channel),
//! one the market went silent on `market_timeout`. Reconnects back
//! off exponentially. An idle channel is pinged every `keepalive_ms`, so a
//! market that closed it (idle timeout) or died is found and redialled
//! before an exchange needs it, and `keybroker_market_up` follows.

use crate::config::ExchangeConfig;
use crate::net::tls_io::TlsIo;
use crate::proto::ErrorCode;
use crate::proto::market::{self, Accepted, ExchangeRequest, Splitter};
use compio::net::TcpStream;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A registered market, as every core sees it.
pub struct MarketInfo {
    pub id: String,
    pub endpoint: String,
    /// The market's CA, the trust anchor for its certificates.
    pub ca_pem: String,
    pub client: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

pub type Reply = Result<Accepted, Failure>;

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

pub struct Pending {
    pub req: ExchangeRequest,
    /// The channel binding the request was signed for.
    pub binding: [u8; 32],
    pub reply: oneshot::Sender<Reply>,
}

/// What the link task tells the exchanges on its core.
#[derive(Default)]
struct State {
    /// The current connection's binding, `None` while down.
    binding: Cell<Option<[u8; 32]>>,
    /// Connection attempts ended either way, so far.
    dials: Cell<u64>,
    /// Fired at every change of the two.
    changed: event_listener::Event,
}

impl State {
    fn set_binding(&self, b: Option<[u8; 32]>) {
        self.binding.set(b);
        self.changed.notify(usize::MAX);
    }

    fn dialled(&self) {
        self.dials.set(self.dials.get() + 1);
        self.changed.notify(usize::MAX);
    }

    /// Waits until `done` says what it found, or `until` passed (`None`).
    /// The listener is made before each look, so no change slips between.
    async fn wait<T>(&self, until: Instant, mut done: impl FnMut(&Self) -> Option<T>) -> Option<T> {
        loop {
            let changed = self.changed.listen();
            if let Some(v) = done(self) {
                return Some(v);
            }
            compio::time::timeout_at(until, changed).await.ok()?;
        }
    }
}

#[derive(Clone)]
pub struct Link {
    tx: mpsc::Sender<Pending>,
    state: Rc<State>,
    wait: Duration,
}

impl Link {
    /// Starts the link task on the current core.
    pub fn spawn(info: Arc<MarketInfo>, cfg: ExchangeConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue);
        let state = Rc::new(State::default());
        let wait = Duration::from_millis(cfg.market_timeout_ms);
        compio::runtime::spawn(run(info, cfg, state.clone(), rx)).detach();
        Self { tx, state, wait }
    }

    /// The current connection's binding, `None` while the market is down.
    /// Right after start it waits for the first connection attempt, so the
    /// first exchanges do not fail only because the link is still dialling.
    pub async fn binding_when_up(&self) -> Option<[u8; 32]> {
        let until = Instant::now() + self.wait;
        self.state
            .wait(until, |s| (s.dials.get() > 0).then_some(()))
            .await;
        self.state.binding.get()
    }

    /// A binding other than `old`: the channel that replaced a broken one.
    /// Waits for the redial (which starts `reconnect_min_ms` after the
    /// loss), at most `market_timeout_ms`; `None` as soon as a dial after
    /// the loss failed, so a market that is gone answers at once.
    pub async fn binding_after(&self, old: [u8; 32]) -> Option<[u8; 32]> {
        let until = Instant::now() + self.wait;
        // Dials ended when the link was first seen down.
        let mut down_at = None;
        self.state
            .wait(until, |s| match s.binding.get() {
                Some(b) if b != old => Some(Some(b)),
                // The link has not seen the old channel break yet.
                Some(_) => None,
                None => match down_at {
                    None => {
                        down_at = Some(s.dials.get());
                        None
                    }
                    Some(d) if s.dials.get() > d => Some(None),
                    Some(_) => None,
                },
            })
            .await
            .flatten()
    }

    /// Queues an exchange; refuses at once when down or full.
    pub fn submit(&self, p: Pending) -> Result<(), Failure> {
        if self.state.binding.get() != Some(p.binding) {
            // The channel it was signed for is gone already.
            return Err(Failure::Broken);
        }
        self.tx.clone().try_send(p).map_err(|e| {
            Failure::Code(if e.is_full() {
                ErrorCode::Busy
            } else {
                ErrorCode::MarketUnavailable
            })
        })
    }
}

fn fail_all(rx: &mut mpsc::Receiver<Pending>, why: Failure) {
    while let Ok(p) = rx.try_recv() {
        let _ = p.reply.send(Err(why));
    }
}

async fn connect(
    info: &MarketInfo,
    timeout: Duration,
) -> anyhow::Result<(TlsIo<ClientConnection>, [u8; 32])> {
    let fut = async {
        let sock = TcpStream::connect(info.endpoint.as_str()).await?;
        sock.set_nodelay(true)?;
        let conn = ClientConnection::new(info.client.clone(), info.server_name.clone())?;
        let mut io = TlsIo::new(sock, conn);
        io.handshake().await?;
        let mut binding = [0u8; 32];
        io.conn
            .export_keying_material(&mut binding, crate::exchange::BINDING_LABEL, None)?;
        anyhow::Ok((io, binding))
    };
    compio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))?
}

async fn run(
    info: Arc<MarketInfo>,
    cfg: ExchangeConfig,
    state: Rc<State>,
    mut rx: mpsc::Receiver<Pending>,
) {
    let min = Duration::from_millis(cfg.reconnect_min_ms);
    let max = Duration::from_millis(cfg.reconnect_max_ms);
    let timeout = Duration::from_millis(cfg.market_timeout_ms);
    let mut backoff = min;
    // One warning per state change: the first failed dial after the link
    // was up (or at start), then the retries at debug level.
    let mut warned = false;
    loop {
        let connected = connect(&info, timeout).await;
        // The binding first: a waiter woken by the dial sees its outcome.
        if let Ok((_, binding)) = &connected {
            state.set_binding(Some(*binding));
        }
        state.dialled();
        match connected {
            Ok((mut io, binding)) => {
                tracing::info!(market = %info.id, "market channel up");
                warned = false;
                crate::metrics::market_link(&info.id, true);
                backoff = min;
                let closed = serve(&mut io, &mut rx, &cfg, binding).await;
                state.set_binding(None);
                crate::metrics::market_link(&info.id, false);
                fail_all(&mut rx, Failure::Broken);
                io.close().await;
                if closed {
                    return;
                }
                tracing::warn!(market = %info.id, "market channel lost");
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(market = %info.id, error = %e, "market unreachable; retrying with backoff (further failures at debug level)")
            }
            Err(e) => {
                tracing::debug!(market = %info.id, error = %e, retry_ms = backoff.as_millis() as u64, "market unreachable")
            }
        }
        // Down: fail whatever still arrives, until the backoff ends. Its
        // jitter (a random half to whole) keeps the cores, and brokers,
        // that lost one market together from redialling it in step.
        let until = Instant::now() + backoff.mul_f64(rand::random_range(0.5..=1.0));
        loop {
            match compio::time::timeout_at(until, rx.next()).await {
                Ok(Some(p)) => {
                    let _ = p
                        .reply
                        .send(Err(Failure::Code(ErrorCode::MarketUnavailable)));
                }
                Ok(None) => return,
                Err(_) => break,
            }
        }
        backoff = (backoff * 2).min(max);
    }
}

/// Serves batches until the connection fails (false) or every sender is
/// gone (true).
async fn serve(
    io: &mut TlsIo<ClientConnection>,
    rx: &mut mpsc::Receiver<Pending>,
    cfg: &ExchangeConfig,
    binding: [u8; 32],
) -> bool {
    let delay = Duration::from_micros(cfg.batch_delay_us);
    let timeout = Duration::from_millis(cfg.market_timeout_ms);
    let mut batch: Vec<Pending> = Vec::with_capacity(cfg.batch_max);
    let mut out = Vec::with_capacity(16 * 1024);
    let mut buf = vec![0u8; 16 * 1024];
    let mut split = Splitter::default();
    let keepalive = Duration::from_millis(cfg.keepalive_ms);
    loop {
        let first = match compio::time::timeout(keepalive, rx.next()).await {
            Ok(Some(p)) => p,
            Ok(None) => return true,
            Err(_) => {
                if !ping(io, &mut split, &mut buf, timeout).await {
                    return false;
                }
                continue;
            }
        };
        batch.push(first);
        let deadline = Instant::now() + delay;
        while batch.len() < cfg.batch_max {
            match rx.try_recv() {
                Ok(p) => {
                    batch.push(p);
                    continue;
                }
                Err(mpsc::TryRecvError::Empty) if !delay.is_zero() => {}
                Err(_) => break,
            }
            match compio::time::timeout_at(deadline, rx.next()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            }
        }
        let started = Instant::now();
        let mut waiting: HashMap<u64, oneshot::Sender<Reply>> = HashMap::with_capacity(batch.len());
        let mut reqs = Vec::with_capacity(batch.len());
        for p in batch.drain(..) {
            if p.binding != binding {
                let _ = p.reply.send(Err(Failure::Broken));
                continue;
            }
            waiting.insert(p.req.request_id, p.reply);
            reqs.push(p.req);
        }
        if reqs.is_empty() {
            continue;
        }
        out.clear();
        market::encode_requests(reqs.iter(), &mut out);
        crate::metrics::market_batch(reqs.len());
        if io.send(&out).await.is_err() {
            fail(waiting, Failure::Broken);
            return false;
        }
        while !waiting.is_empty() {
            let why = match compio::time::timeout(timeout, io.read_some(&mut buf)).await {
                // Silent, not gone: asking again would double the wait.
                Err(_) => Failure::Code(ErrorCode::MarketTimeout),
                Ok(Ok(0)) | Ok(Err(_)) => Failure::Broken,
                Ok(Ok(n)) => {
                    split.push(&buf[..n]);
                    match dispatch(&mut split, &mut waiting) {
                        Ok(()) => continue,
                        Err(()) => Failure::Code(ErrorCode::MarketUnavailable),
                    }
                }
            };
            fail(waiting, why);
            return false;
        }
        crate::metrics::market_round_trip(started.elapsed());
    }
}

/// Pings an idle channel and waits up to `timeout` for the Pong: a market
/// that closed the channel or died is found now, not by the next exchange.
async fn ping(
    io: &mut TlsIo<ClientConnection>,
    split: &mut Splitter,
    buf: &mut [u8],
    timeout: Duration,
) -> bool {
    let mut out = Vec::with_capacity(8);
    market::encode_keepalive(market::TYPE_PING, &mut out);
    if io.send(&out).await.is_err() {
        return false;
    }
    let until = Instant::now() + timeout;
    loop {
        match split.next_frame() {
            Ok(Some(f)) => return market::is_keepalive(&f, market::TYPE_PONG),
            Ok(None) => {}
            Err(_) => return false,
        }
        match compio::time::timeout_at(until, io.read_some(buf)).await {
            Ok(Ok(n)) if n > 0 => split.push(&buf[..n]),
            _ => return false,
        }
    }
}

fn dispatch(
    split: &mut Splitter,
    waiting: &mut HashMap<u64, oneshot::Sender<Reply>>,
) -> Result<(), ()> {
    while let Some(frame) = split.next_frame().map_err(drop)? {
        let replies = market::decode_replies(&frame).map_err(|e| {
            tracing::warn!(error = %e, "malformed reply from the market");
        })?;
        for r in replies {
            if let Some(tx) = waiting.remove(&r.request_id) {
                let _ = tx.send(r.result.map_err(Failure::Code));
            }
        }
    }
    Ok(())
}

fn fail(waiting: HashMap<u64, oneshot::Sender<Reply>>, why: Failure) {
    for (_, tx) in waiting {
        let _ = tx.send(Err(why));
    }
}
