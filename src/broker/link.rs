//! One core's persistent connection to one market: the shell around the
//! sans-IO [`crate::proto::link::LinkCore`], which decides everything
//! (batches, the market timeout, keepalive, loss, backoff with jitter).
//!
//! ```text
//! exchanges ──try_send──► bounded queue ──► run: LinkCore::handle_submit
//!                                            LinkCore::poll_action ─► dial / send / read / wait / close
//! oneshot replies ◄── Event::Reply ◄── LinkCore::handle_bytes ◄── market
//! ```
//!
//! This file only moves bytes and time in and out, and tells the exchanges
//! on its core the channel's binding ([`Link::binding_when_up`],
//! [`Link::binding_after`]). A request whose channel broke after it was
//! queued or sent answers [`Failure::Broken`] (the exchange retries it once
//! on the next channel); one the market went silent on, `market_timeout`.

use crate::config::ExchangeConfig;
use crate::net::tls_io::TlsIo;
use crate::proto::ErrorCode;
use crate::proto::link::{Action, Event, LinkCore, Timers};
use crate::proto::market::ExchangeRequest;
use compio::net::TcpStream;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::cell::Cell;
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

pub use crate::proto::link::{Failure, Reply};

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
    let timeout = Duration::from_millis(cfg.market_timeout_ms);
    let mut core = LinkCore::new(timers(&cfg), rand::random());
    let mut io: Option<TlsIo<ClientConnection>> = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // What is queued now joins the next batch.
        loop {
            match rx.try_recv() {
                Ok(p) => core.handle_submit(Instant::now(), p.req, p.binding, p.reply),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Closed) => return shut_down(core, io, &state, &info).await,
            }
        }
        events(&mut core, &state, &info);
        match core.poll_action(Instant::now()) {
            Action::Dial => {
                let r = match connect(&info, timeout).await {
                    Ok((c, binding)) => {
                        io = Some(c);
                        Ok(binding)
                    }
                    Err(e) => Err(format!("{e:#}")),
                };
                core.handle_dialled(Instant::now(), r);
            }
            Action::Send(bytes) => {
                let ok = match io.as_mut() {
                    Some(c) => c.send(&bytes).await.is_ok(),
                    None => false,
                };
                core.handle_sent(Instant::now(), ok);
            }
            Action::Read { until } => {
                let Some(c) = io.as_mut() else {
                    core.handle_lost(Instant::now());
                    continue;
                };
                match compio::time::timeout_at(until, c.read_some(&mut buf)).await {
                    Err(_) => core.handle_timeout(Instant::now()),
                    Ok(Ok(0)) | Ok(Err(_)) => core.handle_lost(Instant::now()),
                    Ok(Ok(n)) => core.handle_bytes(Instant::now(), &buf[..n]),
                }
            }
            Action::Wait { until } => match compio::time::timeout_at(until, rx.next()).await {
                Ok(Some(p)) => core.handle_submit(Instant::now(), p.req, p.binding, p.reply),
                Ok(None) => return shut_down(core, io, &state, &info).await,
                Err(_) => {}
            },
            Action::Close => {
                if let Some(c) = io.take() {
                    c.close().await;
                }
                core.handle_closed(Instant::now());
            }
        }
    }
}

fn timers(cfg: &ExchangeConfig) -> Timers {
    Timers {
        batch_max: cfg.batch_max,
        batch_delay: Duration::from_micros(cfg.batch_delay_us),
        market_timeout: Duration::from_millis(cfg.market_timeout_ms),
        keepalive: Duration::from_millis(cfg.keepalive_ms),
        reconnect_min: Duration::from_millis(cfg.reconnect_min_ms),
        reconnect_max: Duration::from_millis(cfg.reconnect_max_ms),
        queue: cfg.queue,
    }
}

/// Every exchange on this core is gone (the core stops, or the market was
/// removed): what is left is answered and the channel closed.
async fn shut_down(
    mut core: LinkCore<oneshot::Sender<Reply>>,
    io: Option<TlsIo<ClientConnection>>,
    state: &State,
    info: &MarketInfo,
) {
    core.handle_shutdown();
    events(&mut core, state, info);
    if let Some(c) = io {
        c.close().await;
    }
}

/// Answers the exchanges and tells the waiters, the metrics and the log.
fn events(core: &mut LinkCore<oneshot::Sender<Reply>>, state: &State, info: &MarketInfo) {
    while let Some(e) = core.poll_event() {
        match e {
            Event::Reply(tx, r) => {
                let _ = tx.send(r);
            }
            // The binding first: a waiter woken by the dial sees its outcome.
            Event::Up(binding) => {
                state.set_binding(Some(binding));
                tracing::info!(market = %info.id, "market channel up");
                crate::metrics::market_link(&info.id, true);
            }
            Event::Dialled => state.dialled(),
            Event::DialFailed { error, first: true } => {
                tracing::warn!(market = %info.id, error, "market unreachable; retrying with backoff (further failures at debug level)")
            }
            Event::DialFailed {
                error,
                first: false,
            } => {
                tracing::debug!(market = %info.id, error, "market unreachable")
            }
            Event::Down { lost } => {
                state.set_binding(None);
                crate::metrics::market_link(&info.id, false);
                if lost {
                    tracing::warn!(market = %info.id, "market channel lost");
                }
            }
            Event::Batch(n) => crate::metrics::market_batch(n),
            Event::RoundTrip(d) => crate::metrics::market_round_trip(d),
            Event::Malformed(why) => {
                tracing::warn!(market = %info.id, error = why, "malformed reply from the market")
            }
        }
    }
}
