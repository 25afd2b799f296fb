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
//! batch in flight when it dies fails with `market_unavailable` (or
//! `market_timeout` when it went silent) and nothing else. Reconnects back
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

pub type Reply = Result<Accepted, ErrorCode>;

pub struct Pending {
    pub req: ExchangeRequest,
    /// The channel binding the request was signed for.
    pub binding: [u8; 32],
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Clone)]
pub struct Link {
    tx: mpsc::Sender<Pending>,
    binding: Rc<Cell<Option<[u8; 32]>>>,
    /// False until the first connection attempt has ended either way.
    tried: Rc<Cell<bool>>,
    wait: Duration,
}

impl Link {
    /// Starts the link task on the current core.
    pub fn spawn(info: Arc<MarketInfo>, cfg: ExchangeConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue);
        let binding = Rc::new(Cell::new(None));
        let tried = Rc::new(Cell::new(false));
        let wait = Duration::from_millis(cfg.market_timeout_ms);
        compio::runtime::spawn(run(info, cfg, binding.clone(), tried.clone(), rx)).detach();
        Self {
            tx,
            binding,
            tried,
            wait,
        }
    }

    /// The current connection's binding, `None` while the market is down.
    /// Right after start it waits for the first connection attempt, so the
    /// first exchanges do not fail only because the link is still dialling.
    pub async fn binding_when_up(&self) -> Option<[u8; 32]> {
        let until = Instant::now() + self.wait;
        while !self.tried.get() && Instant::now() < until {
            compio::time::sleep(Duration::from_millis(2)).await;
        }
        self.binding.get()
    }

    /// Queues an exchange; refuses at once when down or full.
    pub fn submit(&self, p: Pending) -> Result<(), ErrorCode> {
        if self.binding.get() != Some(p.binding) {
            return Err(ErrorCode::MarketUnavailable);
        }
        self.tx.clone().try_send(p).map_err(|e| {
            if e.is_full() {
                ErrorCode::Busy
            } else {
                ErrorCode::MarketUnavailable
            }
        })
    }
}

fn fail_all(rx: &mut mpsc::Receiver<Pending>, code: ErrorCode) {
    while let Ok(p) = rx.try_recv() {
        let _ = p.reply.send(Err(code));
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
    state: Rc<Cell<Option<[u8; 32]>>>,
    tried: Rc<Cell<bool>>,
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
        tried.set(true);
        match connected {
            Ok((mut io, binding)) => {
                tracing::info!(market = %info.id, "market channel up");
                warned = false;
                state.set(Some(binding));
                crate::metrics::market_link(&info.id, true);
                backoff = min;
                let closed = serve(&mut io, &mut rx, &cfg, binding).await;
                state.set(None);
                crate::metrics::market_link(&info.id, false);
                fail_all(&mut rx, ErrorCode::MarketUnavailable);
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
        // Down: fail whatever still arrives, until the backoff ends.
        let until = Instant::now() + backoff;
        loop {
            match compio::time::timeout_at(until, rx.next()).await {
                Ok(Some(p)) => {
                    let _ = p.reply.send(Err(ErrorCode::MarketUnavailable));
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
                let _ = p.reply.send(Err(ErrorCode::MarketUnavailable));
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
            fail(waiting, ErrorCode::MarketUnavailable);
            return false;
        }
        while !waiting.is_empty() {
            let code = match compio::time::timeout(timeout, io.read_some(&mut buf)).await {
                Err(_) => ErrorCode::MarketTimeout,
                Ok(Ok(0)) | Ok(Err(_)) => ErrorCode::MarketUnavailable,
                Ok(Ok(n)) => {
                    split.push(&buf[..n]);
                    match dispatch(&mut split, &mut waiting) {
                        Ok(()) => continue,
                        Err(()) => ErrorCode::MarketUnavailable,
                    }
                }
            };
            fail(waiting, code);
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
                let _ = tx.send(r.result);
            }
        }
    }
    Ok(())
}

fn fail(waiting: HashMap<u64, oneshot::Sender<Reply>>, code: ErrorCode) {
    for (_, tx) in waiting {
        let _ = tx.send(Err(code));
    }
}
