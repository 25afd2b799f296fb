//! One core's accept loop and the life of one terminal connection.
//!
//! ```text
//! accept ─► TLS handshake (timeout) ─► X' = exporter ─► ConnCore (proto::conn)
//!        ─► Work ─► auth pool / HSM pool / market link / ledger ─► *_done ─► answers
//! ```
//!
//! A terminal revoked while connected is cut off (`revoke.rs`): before each
//! frame, and while the connection waits for one.

use super::auth::Which;
use super::exchange::{self, Released};
use super::link::Link;
use super::revoke::{Batch, Live};
use super::{Shared, ms};
use crate::crypto::AccessKeys;
use crate::logs::KeyedThrottle;
use crate::net::sources::{Pending, Source, SourceLimits, Sources};
use crate::net::tls_io::TlsIo;
use crate::proto::ErrorCode;
use crate::proto::conn::{Action as ConnAction, ConnCore, Event, Refused, Timeouts, Work};
use compio::net::{TcpListener, TcpStream};
use rustls::ServerConnection;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

pub(super) struct Core {
    pub shared: Arc<Shared>,
    /// This core's own HSM session when `hsm.dispatch = "inline"`.
    pub hsm_inline: Option<RefCell<super::HsmWorker>>,
    pub index: usize,
    /// This core's connection to each market, with the registration it
    /// was made for, made on first use.
    pub links: RefCell<HashMap<String, (Arc<super::link::MarketInfo>, Link)>>,
    /// The markets' epoch `links` was last checked against.
    pub links_epoch: Cell<u64>,
    /// The config epoch this core's copies were taken at, and the
    /// `[exchange]` its links run with.
    cfg_epoch: Cell<u64>,
    exchange: RefCell<crate::config::ExchangeConfig>,
    pub next_request: Cell<u64>,
    /// This core's connections, to wake when their terminal is revoked.
    pub live: Rc<Live>,
    /// Handshakes pending and started per source address on this core.
    pub sources: Rc<Sources>,
    /// The audit lines of refusals a terminal can provoke at no cost
    /// ([`free_refusal`]), one per source, code and second.
    refusals: Rc<RefCell<KeyedThrottle<(Source, ErrorCode)>>>,
}

/// Sources whose free refusals are throttled one by one, per core; past
/// them one throttle covers the rest (`logs::KeyedThrottle`).
const REFUSAL_SOURCES: usize = 4096;

pub(super) fn run_core(
    index: usize,
    cpus: std::collections::HashSet<usize>,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    revocations: futures_channel::mpsc::UnboundedReceiver<Batch>,
) -> anyhow::Result<()> {
    let rt = super::core_runtime(cpus)?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let hsm_inline = match shared.cfg().hsm.dispatch {
            crate::config::Dispatch::Inline => Some(RefCell::new(super::HsmWorker::new(
                shared.hsm.clone(),
                shared.hsm.key_handles()?,
            )?)),
            crate::config::Dispatch::Pool => None,
        };
        let shared_limits = SourceLimits::of(&shared.cfg().broker);
        let exchange = shared.cfg().exchange.clone();
        let cfg_epoch = shared.cfg_epoch();
        let core = Rc::new(Core {
            hsm_inline,
            shared,
            index,
            links: RefCell::new(HashMap::new()),
            links_epoch: Cell::new(0),
            cfg_epoch: Cell::new(cfg_epoch),
            exchange: RefCell::new(exchange),
            next_request: Cell::new(0),
            live: Rc::new(Live::default()),
            sources: Sources::new(shared_limits),
            refusals: Rc::new(RefCell::new(KeyedThrottle::new(
                std::time::Duration::from_secs(1),
                REFUSAL_SOURCES,
            ))),
        });
        compio::runtime::spawn(core.live.clone().listen(revocations)).detach();
        let metrics = crate::metrics::attach_core(index);
        // Dial every market now, and each one added later within a poll,
        // so exchanges find the link up and `keybroker_market_up` tells the
        // truth from the start.
        compio::runtime::spawn(core.clone().follow_markets()).detach();
        let beats = core.shared.heartbeats.clone();
        compio::runtime::spawn(async move {
            loop {
                beats.beat(index);
                compio::time::sleep(crate::service::HEARTBEAT).await;
            }
        })
        .detach();
        let max = core.shared.cfg().broker.max_connections_per_core;
        let live = Rc::new(Cell::new(0));
        let proxied = core.shared.cfg().broker.proxy_protocol;
        crate::net::accept_loop(listener, live, max, move |stream| {
            // Without PROXY headers the source is known now: admit it here.
            let admitted = if proxied {
                None
            } else {
                let peer = stream.peer_addr().ok();
                Some((peer, admit(&core, peer)?))
            };
            let core = core.clone();
            let metrics = metrics.clone();
            Some(async move {
                metrics.connections.inc();
                serve(&core, stream, admitted).await;
                metrics.connections.dec();
            })
        })
        .await;
        Ok(())
    })
}

impl Core {
    /// This core's link to `market`, started on first use.
    pub fn link(&self, market: &str) -> Result<Link, ErrorCode> {
        self.sync_links();
        if let Some((_, l)) = self.links.borrow().get(market) {
            return Ok(l.clone());
        }
        let info = self
            .shared
            .markets
            .get(market)
            .ok_or(ErrorCode::UnknownMarket)?;
        let l = Link::spawn(info.clone(), self.exchange.borrow().clone());
        self.links
            .borrow_mut()
            .insert(market.to_owned(), (info, l.clone()));
        Ok(l)
    }

    /// Drops the links of markets removed or changed in the registry since
    /// this core last looked (one atomic load when nothing changed).
    fn sync_links(&self) {
        self.sync_cfg();
        let epoch = self.shared.markets.epoch();
        if self.links_epoch.replace(epoch) == epoch {
            return;
        }
        let now = self.shared.markets.snapshot();
        self.links
            .borrow_mut()
            .retain(|id, (info, _)| now.get(id).is_some_and(|n| Arc::ptr_eq(n, info)));
    }

    /// Takes a reloaded config's per-core settings (one atomic load when
    /// there was none): the source limits for the next connections, and
    /// for a changed `[exchange]` new links (the old ones finish what they
    /// hold; `follow_markets` dials the new ones).
    fn sync_cfg(&self) {
        let epoch = self.shared.cfg_epoch();
        if self.cfg_epoch.replace(epoch) == epoch {
            return;
        }
        let cfg = self.shared.cfg();
        self.sources.set_limits(SourceLimits::of(&cfg.broker));
        if *self.exchange.borrow() != cfg.exchange {
            self.exchange.replace(cfg.exchange.clone());
            self.links.borrow_mut().clear();
        }
    }

    /// Keeps a link up to every registered market, and none to a removed one.
    async fn follow_markets(self: Rc<Self>) {
        loop {
            self.sync_links();
            for id in self.shared.markets.snapshot().keys() {
                let _ = self.link(id);
            }
            compio::time::sleep(super::markets::POLL).await;
        }
    }

    /// A request id unique across cores and connections of this process.
    pub fn request_id(&self) -> u64 {
        let n = self.next_request.get();
        self.next_request.set(n + 1);
        ((self.index as u64) << 48) | n
    }
}

/// What the shell keeps beside the core: the channel, and whom the
/// connection's audit lines concern.
struct Conn {
    io: TlsIo<ServerConnection>,
    fingerprint: [u8; 32],
    /// X': the confirmation went into the session; the wrap key is kept.
    keys: AccessKeys,
    /// The terminal's address (from the PROXY header behind HAProxy),
    /// formatted once for the connection's audit lines.
    peer: Box<str>,
    source: Source,
    /// The user the connection's last Login named, refused or not: the
    /// user a refusal concerns.
    user: Option<Box<str>>,
    /// The registry serial of the terminal, from its certificate's name,
    /// read at the first refusal.
    serial: Option<Box<str>>,
    /// The market of the exchange being answered.
    market: Option<Box<str>>,
    refusals: Rc<RefCell<KeyedThrottle<(Source, ErrorCode)>>>,
    /// The revocation epoch this connection last checked its terminal at.
    revocations_seen: u64,
}

impl Conn {
    /// Whether this connection's terminal was revoked (or its user removed)
    /// since the session began: one atomic load while nothing was.
    fn revoked(&mut self, core: &Core) -> bool {
        core.shared
            .revoked
            .check(&mut self.revocations_seen, &self.fingerprint)
    }

    /// The core's events: a metric and an audit line per refusal.
    fn events(&mut self, conn: &mut ConnCore<Released>) {
        while let Some(Event::Refused { code, detail, .. }) = conn.poll_event() {
            crate::metrics::error(code);
            self.audit(code, &detail);
        }
    }

    /// Hands the core's answers to TLS; the last one leaves with the
    /// close_notify, in one send.
    fn queue(&mut self, conn: &mut ConnCore<Released>) -> bool {
        let ok = self.io.queue(conn.out()).is_ok();
        conn.sent();
        ok
    }

    /// The audit line of a refusal: every typed error the terminal is
    /// sent, with whom it concerns (docs/OPERATIONS.md, "Refusals"). One
    /// a refusal, except where the terminal pays nothing for one
    /// ([`free_refusal`]): one a second per source and code, with the
    /// count held back.
    fn audit(&mut self, code: ErrorCode, detail: &str) {
        let suppressed = if free_refusal(code) {
            let now = crate::limits::mono_ms();
            match self.refusals.borrow_mut().pass((self.source, code), now) {
                Some(n) => n,
                None => return,
            }
        } else {
            0
        };
        self.read_serial();
        // Most details only repeat the code's name.
        let detail = if detail == code.name() { "-" } else { detail };
        tracing::warn!(target: "audit", peer = %self.peer,
            terminal = %hex::encode(self.fingerprint),
            serial = %self.serial.as_deref().unwrap_or("-"),
            user = %self.user.as_deref().unwrap_or("-"),
            market = %self.market.as_deref().unwrap_or("-"),
            code = %code.name(), detail, suppressed, "refused");
    }

    /// The serial `terminal enroll` gave the certificate, which names it
    /// `terminal SERIAL of USER`: what `terminal list` and `terminal
    /// revoke` take. "-" for a name of another form.
    fn read_serial(&mut self) {
        if self.serial.is_none() {
            let serial = self
                .io
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| crate::pki::common_name(der))
                .and_then(|cn| {
                    let rest = cn.strip_prefix("terminal ")?;
                    Some(rest.split_once(" of ").map_or(rest, |(s, _)| s).to_owned())
                })
                .unwrap_or_else(|| "-".to_owned());
            self.serial = Some(serial.into());
        }
    }
}

/// Refusals a terminal can have in a loop for nothing: no password
/// check, no exchange and no ledger write behind them, and the connection
/// stays open. Their audit lines are throttled; every other refusal is
/// bounded by a rate limit (password checks, exchanges) or by the
/// handshake rate (those that close), and logged one by one.
fn free_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Busy | ErrorCode::Unexpected | ErrorCode::NotLoggedIn | ErrorCode::NotReleased
    )
}

/// Counts a refused handshake and logs it, once per source and reason per
/// interval (`net::sources`), so a certificate-probing scan shows with its
/// source and cannot fill the disk.
fn refuse(core: &Core, source: Source, peer: Option<std::net::SocketAddr>, reason: &'static str) {
    crate::metrics::handshake_refused(reason);
    let now = crate::limits::mono_ms();
    if let Some(suppressed) = core.sources.log_refusal(source, reason, now) {
        let peer = peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        tracing::warn!(peer = %peer, reason, suppressed, "TLS handshake refused");
    }
}

/// The `keybroker_handshake_refused_total` reason of a failed handshake.
fn tls_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    use std::io::ErrorKind;
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => "no_certificate",
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => "unknown_ca",
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        Some(_) => "protocol",
        None if matches!(
            e.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ) =>
        {
            "closed"
        }
        None => "protocol",
    }
}

/// Counts a new connection from `peer` against its source, or refuses it.
fn admit(core: &Core, peer: Option<std::net::SocketAddr>) -> Option<Pending> {
    let source = Source::of(peer.map(|a| a.ip()));
    core.sync_cfg();
    match core.sources.admit(source, crate::limits::mono_ms()) {
        Ok(p) => Some(p),
        Err(why) => {
            refuse(core, source, peer, why.reason());
            None
        }
    }
}

/// One terminal connection; `admitted`: its peer and pending slot when
/// admitted at accept, None behind HAProxy (the PROXY header names it).
async fn serve(
    core: &Core,
    mut stream: TcpStream,
    admitted: Option<(Option<std::net::SocketAddr>, Pending)>,
) {
    let shared = &core.shared;
    // The config in force when the connection came: its timeouts hold for it.
    let running = arc_swap::Guard::into_inner(shared.cfg());
    let cfg = &running.broker;
    let (peer, preload, pending) = match admitted {
        Some((peer, pending)) => (peer, Vec::new(), pending),
        None => {
            // Behind HAProxy the terminal's address comes in a PROXY header.
            let header = compio::time::timeout(
                ms(cfg.handshake_timeout_ms),
                crate::net::proxy::read_header(&mut stream),
            )
            .await;
            let Ok(Ok((peer, preload))) = header else {
                let from = stream.peer_addr().ok();
                refuse(core, Source::of(from.map(|a| a.ip())), from, "proxy_header");
                return;
            };
            let Some(pending) = admit(core, peer) else {
                return;
            };
            (peer, preload, pending)
        }
    };
    let source = pending.source();
    let conn = match ServerConnection::new(shared.tls.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "TLS session setup failed");
            return;
        }
    };
    let mut io = TlsIo::new(stream, conn);
    if let Err(e) = io.preload(&preload) {
        return refuse(core, source, peer, tls_reason(&e));
    }
    let started = std::time::Instant::now();
    match compio::time::timeout(ms(cfg.handshake_timeout_ms), io.accept()).await {
        Ok(Ok(())) => pending.done(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return refuse(core, source, peer, tls_reason(&e));
        }
        Err(_) => {
            pending.timed_out(crate::limits::mono_ms());
            return refuse(core, source, peer, "timeout");
        }
    }
    crate::metrics::handshake_done(started.elapsed());
    let Some(fingerprint) = io
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| crate::pki::fingerprint(c))
    else {
        return; // rustls already required a client certificate
    };
    let Ok(keys) = AccessKeys::export(&*io.conn) else {
        return;
    };
    // A resumption skips the client verifier: the restored certificate's
    // dates are checked here (broker/tickets.rs).
    let expired = super::tickets::resumed_past_validity(&io.conn);
    let mut conn = ConnCore::new(
        keys.confirm(),
        cfg.max_frame,
        Timeouts {
            idle: ms(cfg.idle_timeout_ms),
            frame: ms(cfg.frame_timeout_ms),
        },
    );
    let mut c = Conn {
        io,
        fingerprint,
        keys,
        peer: peer.map_or_else(|| "unknown".into(), |a| a.to_string().into()),
        source,
        user: None,
        serial: None,
        market: None,
        refusals: core.refusals.clone(),
        revocations_seen: 0,
    };
    if expired {
        conn.end(
            0,
            ErrorCode::TerminalRevoked,
            "terminal certificate expired",
        );
    }
    // Registered before the first check: a revocation the core saw
    // earlier is in the set, a later one wakes the read below.
    let (_registered, mut revoked) = core.live.register(fingerprint);
    let mut buf = vec![0u8; 4096];
    loop {
        if c.revoked(core) {
            conn.handle_revoked();
        }
        let action = conn.poll_action(Instant::now());
        c.events(&mut conn);
        match action {
            ConnAction::Work(w) => perform(core, &mut conn, &mut c, w).await,
            ConnAction::Send => {
                if !c.queue(&mut conn) || c.io.flush().await.is_err() {
                    return;
                }
            }
            ConnAction::Close => {
                c.queue(&mut conn);
                c.io.close().await;
                return;
            }
            ConnAction::Read { until } => {
                let wait = until.saturating_duration_since(Instant::now());
                let read = compio::time::timeout(wait, async {
                    let read = std::pin::pin!(c.io.read_some(&mut buf));
                    match futures_util::future::select(read, &mut revoked).await {
                        futures_util::future::Either::Left((r, _)) => Some(r),
                        futures_util::future::Either::Right(_) => None,
                    }
                })
                .await;
                match read {
                    Ok(None) => conn.handle_revoked(),
                    Ok(Some(Ok(0))) | Ok(Some(Err(_))) => return,
                    Ok(Some(Ok(n))) => {
                        conn.handle_bytes(&buf[..n]);
                        // Plaintext may hold a password; keep one copy, not two.
                        zeroize::Zeroize::zeroize(&mut buf[..n]);
                    }
                    Err(_) => conn.handle_timeout(Instant::now()),
                }
            }
            // The shell runs one Work to its end before it polls again, so
            // the core never waits on it; if it ever did, the connection
            // ends rather than spin.
            ConnAction::Wait => {
                tracing::error!("connection core waits on no work; closing");
                return;
            }
        }
    }
}

/// Runs a closure when dropped, so a gauge comes back down on every path.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Runs one [`Work`] and hands its result to the core.
async fn perform(core: &Core, conn: &mut ConnCore<Released>, c: &mut Conn, work: Work) {
    let shared = &core.shared;
    crate::metrics::inflight(1);
    let _done = Defer(|| crate::metrics::inflight(-1));
    match work {
        Work::CheckLogin { check, password } => {
            let user = check.user();
            c.user = Some(user.into());
            let r = shared
                .auth
                .check(Which::Access, c.fingerprint, user, password)
                .await
                .map(drop);
            if r.is_ok() {
                tracing::info!(target: "audit", user, peer = %c.peer, "login");
            }
            conn.login_done(check, r);
        }
        Work::CheckRelease { check, password } => {
            let user = check.user();
            let r = release(core, c, user, password).await;
            if r.is_ok() {
                tracing::info!(target: "audit", user, peer = %c.peer, "released");
            }
            conn.release_done(check, r);
        }
        Work::Exchange {
            req,
            market,
            ephemeral,
        } => {
            let user = req.user();
            c.market = Some(market.as_str().into());
            let r = match (shared.exchange_allowed(user), conn.released()) {
                // Not an exchange: its busy's audit line is throttled.
                (Err(ms), _) => Err(Refused {
                    code: ErrorCode::Busy,
                    retry_ms: Some(ms),
                }),
                (Ok(()), None) => Err(ErrorCode::NotReleased.into()),
                (Ok(()), Some(rel)) => {
                    let r =
                        exchange::exchange(core, rel, user, &market, ephemeral, c.keys.wrap_key())
                            .await;
                    // A refused one has its line as it is sent (`Conn::audit`).
                    if r.is_ok() {
                        let mode = if ephemeral.is_some() {
                            "partial"
                        } else {
                            "full"
                        };
                        tracing::info!(target: "audit", user, peer = %c.peer, market, mode, result = "ok", "exchange");
                    }
                    r.map_err(Refused::from)
                }
            };
            conn.request_done(req, r);
            c.events(conn);
            // The exchange's answer (and its audit line) is out.
            c.market = None;
        }
        Work::Wallet { req, call } => {
            let r = super::wallet::handle(core, conn.released(), req.user(), call).await;
            conn.request_done(req, r.map_err(Refused::from));
        }
    }
}

async fn release(
    core: &Core,
    c: &mut Conn,
    user: &str,
    password: crate::proto::access::Password,
) -> Result<Released, Refused> {
    let (key, record) = super::card::open(core, c.fingerprint, user, password).await?;
    Ok(Released {
        key,
        terminal: c.fingerprint,
        mail: record.mail.clone(),
        fingerprint: crate::pki::fingerprint(&record.cert),
        cert: Arc::new(record.cert),
    })
}
