//! The market's network side: thread per core, compio, two listeners.
//!
//! ```text
//! market channel: TLS 1.3 (broker cert from the broker CA) ─► ChannelCore (batch ─► MarketState::exchange ─► batch reply)
//! direct channel: Hello{session} ─► HelloOk ─► Record ⇄ Record (answers each request)
//! ```

use super::channel::{Action as ChannelAction, ChannelCore, Event as ChannelEvent};
use super::direct::{Action as DirectAction, DirectConn, Refusal};
use super::{MarketConfig, MarketState, now_ms};
use crate::exchange::BINDING_LABEL;
use crate::net::sources::{Pending, Source, SourceLimits, Sources};
use crate::net::tls_io::TlsIo;
use crate::proto::access::MAX_USER;
use crate::proto::direct;
use anyhow::{Context, Result};
use compio::BufResult;
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::{TcpListener, TcpStream};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Refused exchanges: an audit line per user and code a second, with the
/// count held back, for the whole process. A broker is authenticated, but
/// what it forwards comes from terminals.
static REFUSED: std::sync::LazyLock<
    std::sync::Mutex<crate::logs::KeyedThrottle<(String, crate::proto::ErrorCode)>>,
> = std::sync::LazyLock::new(|| {
    std::sync::Mutex::new(crate::logs::KeyedThrottle::new(
        Duration::from_secs(1),
        4096,
    ))
});

/// Market-channel connections per core: one per broker core per market.
const MAX_CHANNELS_PER_CORE: usize = 1024;

pub struct MarketServer {
    pub addr: SocketAddr,
    pub direct_addr: SocketAddr,
    pub state: Arc<MarketState>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl MarketServer {
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn tls_config(cfg: &MarketConfig, base: &Path) -> Result<Arc<ServerConfig>> {
    let read = |p: &Path| {
        std::fs::read(base.join(p)).with_context(|| format!("reading {}", base.join(p).display()))
    };
    let certs = crate::pki::certs_pem(&read(&cfg.cert)?)?;
    let key = crate::pki::private_key_pem(&read(&cfg.key)?).context("the market key file")?;
    let mut roots = RootCertStore::empty();
    for c in crate::pki::certs_pem(&read(&cfg.broker_ca)?)? {
        roots.add(c)?;
    }
    let provider = crate::net::tls_io::provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    sc.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(sc))
}

/// Binds both listeners and starts the core threads.
pub fn start(cfg_path: &Path) -> Result<MarketServer> {
    let (cfg, base) = MarketConfig::load(cfg_path)?;
    let tls = tls_config(&cfg, &base)?;
    let user_ca = crate::pki::read_cert_pem(&std::fs::read_to_string(base.join(&cfg.user_ca))?)?;
    let cores = if cfg.cores == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.cores
    };
    let caps = crate::net::fds::fit_caps(
        cores,
        0,
        &[
            (
                "the market channel's connections per core",
                MAX_CHANNELS_PER_CORE,
            ),
            (
                "max_direct_connections_per_core",
                cfg.max_direct_connections_per_core,
            ),
        ],
    )?;
    let (max_channels, max_direct) = (caps[0], caps[1]);
    let place = crate::net::cores::Placement::for_cores(cores, cfg.pin_cores);
    let steer = place.steered();
    let (chan, addr) = crate::net::listen::reuseport_group(cfg.listen, cores, 1024, steer)
        .context("market listener")?;
    let (dir, direct_addr) =
        crate::net::listen::reuseport_group(cfg.direct_listen, cores, 1024, steer)
            .context("direct listener")?;
    let endpoint = cfg
        .direct_endpoint
        .clone()
        .unwrap_or_else(|| direct_addr.to_string());
    let read = |p: &Path| {
        std::fs::read_to_string(base.join(p)).with_context(|| {
            format!(
                "reading {} (`keybroker market init` makes it)",
                base.join(p).display()
            )
        })
    };
    let cancel_key = zeroize::Zeroizing::new(
        crate::pki::pem_der(&read(&cfg.cancel_key)?, "PRIVATE KEY")
            .context("the cancel-signing key (PKCS#8 PEM)")?,
    );
    let cancel_cert = crate::pki::read_cert_pem(&read(&cfg.cancel_cert)?)?;
    let orders = super::orders::Orders::open(&base.join(&cfg.orders_db))?;
    let state = Arc::new(
        MarketState::new(cfg, &user_ca, endpoint)?
            .with_orders(orders)
            .with_signer(&cancel_key, cancel_cert)?,
    );
    let mut threads = Vec::new();
    for (i, (c, d)) in chan.into_iter().zip(dir).enumerate() {
        let state = state.clone();
        let tls = tls.clone();
        let cpus = place.cpus_of(i);
        threads.push(
            std::thread::Builder::new()
                .name(format!("market-{i}"))
                .spawn(move || {
                    if let Err(e) = run_core(cpus, c, d, state, tls, (max_channels, max_direct)) {
                        tracing::error!(error = %e, "market core stopped");
                    }
                })?,
        );
    }
    tracing::info!(%addr, %direct_addr, "market listening");
    Ok(MarketServer {
        addr,
        direct_addr,
        state,
        threads,
    })
}

fn run_core(
    cpus: std::collections::HashSet<usize>,
    chan: std::net::TcpListener,
    dir: std::net::TcpListener,
    state: Arc<MarketState>,
    tls: Arc<ServerConfig>,
    (max_channels, max_direct): (usize, usize),
) -> Result<()> {
    let rt = crate::net::core_runtime(cpus)?;
    rt.block_on(async move {
        let chan = TcpListener::from_std(chan)?;
        let dir = TcpListener::from_std(dir)?;
        let s = state.clone();
        // Connections still in their Hello, per source: no rate limit here
        // (a Hello costs no signature), only the cap on what one host holds.
        let sources = Sources::new(SourceLimits {
            max_pending: state.cfg.max_pending_per_source,
            rate: crate::limits::Rate { per_s: 0, burst: 1 },
        });
        compio::runtime::spawn(crate::net::accept_loop(
            dir,
            Rc::new(Cell::new(0)),
            max_direct,
            move |stream| {
                // Refused at accept over the source's cap: no task made.
                let pending = admit_direct(&sources, &stream)?;
                let s = s.clone();
                Some(async move { serve_direct(&s, pending, stream).await })
            },
        ))
        .detach();
        let live = Rc::new(Cell::new(0));
        crate::net::accept_loop(chan, live, max_channels, move |stream| {
            let s = state.clone();
            let tls = tls.clone();
            Some(async move { serve_channel(&s, tls, stream).await })
        })
        .await;
        Ok(())
    })
}

async fn serve_channel(state: &MarketState, tls: Arc<ServerConfig>, stream: TcpStream) {
    let idle = Duration::from_millis(state.cfg.idle_timeout_ms);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let Ok(conn) = ServerConnection::new(tls) else {
        return;
    };
    let mut io = TlsIo::new(stream, conn);
    if !matches!(
        compio::time::timeout(Duration::from_secs(5), io.accept()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let mut binding = [0u8; 32];
    if io
        .conn
        .export_keying_material(&mut binding, BINDING_LABEL, None)
        .is_err()
    {
        return;
    }
    let mut core = ChannelCore::new(binding, idle);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let action = core.poll_action(state, Instant::now(), now_ms());
        while let Some(e) = core.poll_event() {
            log(&peer, e);
        }
        match action {
            ChannelAction::Send => {
                if io.send(core.out()).await.is_err() {
                    return;
                }
                core.sent();
            }
            ChannelAction::Close => return io.close().await,
            ChannelAction::Read { until } => {
                let wait = until.saturating_duration_since(Instant::now());
                match compio::time::timeout(wait, io.read_some(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => core.handle_bytes(&buf[..n]),
                    Ok(_) => return io.close().await,
                    Err(_) => core.handle_timeout(Instant::now()),
                }
            }
        }
    }
}

/// A market-channel event's log line: refusals are audit lines, one per
/// user and code a second ([`REFUSED`]).
fn log(peer: &str, e: ChannelEvent) {
    match e {
        ChannelEvent::Accepted { user, request_id } => {
            tracing::debug!(user = %user, request = request_id, "exchange accepted")
        }
        ChannelEvent::Refused {
            user,
            request_id,
            code,
        } => {
            let passed = REFUSED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pass((user.clone(), code), crate::limits::mono_ms());
            if let Some(suppressed) = passed {
                tracing::info!(target: "audit", broker = %peer, user = %user, request = request_id, code = code.name(), suppressed, "market refused exchange");
            }
        }
        ChannelEvent::Malformed => {
            tracing::warn!(broker = %peer, "malformed frame from the broker; closing")
        }
    }
}

async fn write(sock: &mut TcpStream, out: Vec<u8>) -> Option<Vec<u8>> {
    let BufResult(r, out) = sock.write_all(out).await;
    r.ok().map(|()| out)
}

/// Every refusal is an audit line with the peer.
fn audit(peer: &str, why: &Refusal) {
    tracing::warn!(
        target: "audit",
        peer = %peer,
        user = %why.user.as_deref().unwrap_or("-"),
        session = %why.session.map_or_else(|| "-".to_owned(), hex::encode),
        code = %why.code.name(),
        "direct channel refused"
    );
}

/// Counts a direct connection against its source until its Hello
/// completes, or refuses it (one log line per source and interval).
fn admit_direct(sources: &Rc<Sources>, sock: &TcpStream) -> Option<Pending> {
    let addr = sock.peer_addr().ok();
    let source = Source::of(addr.map(|a| a.ip()));
    let now = crate::limits::mono_ms();
    match sources.admit(source, now) {
        Ok(p) => Some(p),
        Err(why) => {
            if let Some(suppressed) = sources.log_refusal(source, why.reason(), now) {
                let peer = addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
                tracing::warn!(peer = %peer, reason = why.reason(), suppressed, "direct connection refused");
            }
            None
        }
    }
}

/// One direct connection: `DirectConn` decides, this moves the bytes.
async fn serve_direct(state: &MarketState, pending: Pending, mut sock: TcpStream) {
    let peer = sock
        .peer_addr()
        .map_or_else(|_| "-".to_owned(), |a| a.to_string());
    let mut pending = Some(pending);
    let mut conn = DirectConn::new(
        Instant::now(),
        Duration::from_millis(state.cfg.hello_timeout_ms),
        Duration::from_millis(state.cfg.idle_timeout_ms),
    );
    let mut rbuf = Vec::with_capacity(16 * 1024);
    let mut spare = Vec::with_capacity(1024);
    loop {
        let action = conn.poll_action(state, Instant::now(), now_ms());
        if conn.established()
            && let Some(p) = pending.take()
        {
            p.done();
        }
        match action {
            DirectAction::Send => match write(&mut sock, conn.take_out(spare)).await {
                Some(b) => spare = b,
                None => return,
            },
            DirectAction::Close { refused } => {
                if let Some(why) = &refused {
                    audit(&peer, why);
                }
                let _ = write(&mut sock, conn.take_out(spare)).await;
                return;
            }
            DirectAction::Read { until } => {
                rbuf.clear();
                let wait = until.saturating_duration_since(Instant::now());
                match compio::time::timeout(wait, sock.read(rbuf)).await {
                    Ok(BufResult(Ok(n), b)) if n > 0 => {
                        conn.handle_bytes(&b[..n]);
                        rbuf = b;
                    }
                    Ok(_) => return,
                    Err(_) => {
                        conn.handle_timeout(Instant::now());
                        rbuf = Vec::with_capacity(16 * 1024);
                    }
                }
            }
        }
    }
}

/// Direct-channel commands of the reference market (docs/PROTOCOL.md §3.1).
pub const RECEIPT: &[u8] = b"RECEIPT ";
pub const CANCEL: &[u8] = b"CANCEL ";
pub const CANCEL_AUTH: &[u8] = b"CANCEL-AUTH ";

/// The reference market's answer to a direct request: it checks receipts,
/// authorises cancellations, and otherwise names the market and user and
/// echoes the request, so a terminal can check the round trip.
pub fn answer(state: &MarketState, user: &str, request: &[u8], now_ms: u64) -> Vec<u8> {
    if let Some(receipt) = request.strip_prefix(RECEIPT) {
        return match state.verify_receipt(receipt, user, now_ms) {
            Ok(decision) => {
                tracing::info!(user, decision, "receipt accepted");
                format!("RECEIPT OK {decision}").into_bytes()
            }
            Err(why) => {
                tracing::info!(user, why, "receipt refused");
                format!("RECEIPT REFUSED {why}").into_bytes()
            }
        };
    }
    if let Some(decision) = request.strip_prefix(CANCEL) {
        let decision = String::from_utf8_lossy(&decision[..decision.len().min(MAX_USER)]);
        return match state.authorise_cancel(&decision, user, now_ms) {
            Ok(auth) => {
                tracing::info!(user, decision = %decision, "cancel authorised");
                use crate::proto::wire::Put;
                let mut a = CANCEL_AUTH.to_vec();
                a.put_bytes(&auth);
                a
            }
            Err(why) => {
                tracing::info!(user, decision = %decision, why, "cancel refused");
                format!("CANCEL REFUSED {why}").into_bytes()
            }
        };
    }
    let mut a = format!("market {} to {user}: ", state.cfg.id).into_bytes();
    a.extend_from_slice(&request[..request.len().min(direct::MAX_PAYLOAD - 512)]);
    a
}
