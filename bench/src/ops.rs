//! The terminal side of each scenario, on the real terminal library.

use crate::env::{MARKET_ID, TerminalInfo};
use crate::load::Op;
use keybroker::terminal::{Direct, Terminal, TerminalConfig};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A copy of the terminal's config that never resumes: every connection
/// is a full handshake.
pub fn no_resume(tc: &TerminalConfig) -> TerminalConfig {
    let mut c = (*tc.client).clone();
    c.resumption = rustls::client::Resumption::disabled();
    TerminalConfig {
        client: Arc::new(c),
        server_name: tc.server_name.clone(),
    }
}

/// A copy with its own, empty ticket cache (one per worker).
pub fn own_tickets(tc: &TerminalConfig) -> TerminalConfig {
    let mut c = (*tc.client).clone();
    c.resumption = rustls::client::Resumption::in_memory_sessions(32);
    TerminalConfig {
        client: Arc::new(c),
        server_name: tc.server_name.clone(),
    }
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

/// Connects, logs in and releases (a full session set-up), Login and
/// Release in one flight as the bundled terminal sends them.
pub fn released(
    addr: SocketAddr,
    t: &TerminalInfo,
    tc: &TerminalConfig,
) -> Result<Terminal, String> {
    Terminal::connect_and_release(
        addr,
        tc,
        TIMEOUT,
        &t.user,
        t.first.as_bytes(),
        t.second.as_bytes(),
    )
    .map_err(e("connect, login and release"))
}

/// `connect`: a new session each time: full TLS handshake with the client
/// certificate (no ticket), login, release; then logout.
pub struct Connect {
    pub addr: SocketAddr,
    pub t: TerminalInfo,
    pub tc: TerminalConfig,
}

impl Op for Connect {
    fn run(&mut self) -> Result<(), String> {
        let term = released(self.addr, &self.t, &self.tc)?;
        if term.resumed() {
            return Err("a connect scenario session was resumed".into());
        }
        term.logout().map_err(e("logout"))
    }
}

/// `resume`: reconnect with a session ticket (asserted), then login (first
/// password only), then logout.
pub struct Resume {
    pub addr: SocketAddr,
    pub t: TerminalInfo,
    pub tc: TerminalConfig,
}

impl Resume {
    /// Takes the first tickets with one full session (not measured).
    pub fn new(addr: SocketAddr, t: TerminalInfo) -> Result<Self, String> {
        let tc = own_tickets(&t.config);
        let term = Terminal::connect_and_login(addr, &tc, TIMEOUT, &t.user, t.first.as_bytes())
            .map_err(e("connect and login"))?;
        term.logout().map_err(e("logout"))?;
        Ok(Self { addr, t, tc })
    }
}

impl Op for Resume {
    fn run(&mut self) -> Result<(), String> {
        let term = Terminal::connect_and_login(
            self.addr,
            &self.tc,
            TIMEOUT,
            &self.t.user,
            self.t.first.as_bytes(),
        )
        .map_err(e("connect and login"))?;
        if !term.resumed() {
            return Err("not resumed".into());
        }
        term.logout().map_err(e("logout"))
    }
}

/// A released session that reconnects (unmeasured cost counted in the op
/// that needed it) if the broker closed it.
pub struct Session {
    pub addr: SocketAddr,
    pub t: TerminalInfo,
    pub tc: TerminalConfig,
    pub term: Option<Terminal>,
}

impl Session {
    pub fn new(addr: SocketAddr, t: TerminalInfo) -> Result<Self, String> {
        let tc = no_resume(&t.config);
        let term = released(addr, &t, &tc)?;
        Ok(Self {
            addr,
            t,
            tc,
            term: Some(term),
        })
    }

    pub fn term(&mut self) -> Result<&mut Terminal, String> {
        if self.term.is_none() {
            self.term = Some(released(self.addr, &self.t, &self.tc)?);
        }
        Ok(self.term.as_mut().expect("just set"))
    }

    /// One exchange (full or partial) and one direct request with X.
    pub fn exchange(&mut self, partial: bool) -> Result<(), String> {
        let term = self.term()?;
        let r = if partial {
            term.exchange_partial(MARKET_ID)
        } else {
            term.exchange(MARKET_ID)
        };
        let b = match r {
            Ok(b) => b,
            Err(err) => {
                if err.code().is_none() {
                    self.term = None; // transport failure: reconnect next time
                }
                return Err(format!("exchange: {err}"));
            }
        };
        let (_, reply) = Direct::open(&b, TIMEOUT, b"bench quote").map_err(e("direct request"))?;
        if reply.is_empty() {
            return Err("empty direct reply".into());
        }
        Ok(())
    }
}

/// `exchange_software` / `exchange_hsm`: a full-proxy exchange and one
/// direct request with X, on an already released session.
pub struct Exchange(pub Session);

impl Op for Exchange {
    fn run(&mut self) -> Result<(), String> {
        self.0.exchange(false)
    }
}

/// `purchase`: a durable debit with a signed receipt, on a released
/// session; every op has its own idempotency key.
pub struct Purchase {
    pub session: Session,
    pub next: Arc<AtomicU64>,
}

impl Purchase {
    /// Funds the user's wallet with one big voucher (not measured).
    pub fn fund(addr: SocketAddr, t: &TerminalInfo, issuer_key: &[u8]) -> Result<(), String> {
        let amount = keybroker::wallet::Amount::new(100_000_000_000, "EUR").map_err(e("amount"))?;
        let expiry = keybroker::wallet::now_ms() + 3_600_000;
        let (_, v) = keybroker::wallet::voucher::issue(issuer_key, &t.user, amount, expiry)
            .map_err(e("voucher"))?;
        let mut term = released(addr, t, &no_resume(&t.config))?;
        term.top_up(&v, t.second.as_bytes()).map_err(e("top-up"))?;
        term.logout().map_err(e("logout"))
    }
}

impl Op for Purchase {
    fn run(&mut self) -> Result<(), String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let term = self.session.term()?;
        term.purchase(MARKET_ID, 1, "EUR", "bench", &format!("bench-{n}"))
            .map(drop)
            .map_err(e("purchase"))
    }
}

/// Counts of what `mixed` did, for its weighted floor.
#[derive(Default)]
pub struct MixCounts {
    pub full: AtomicU64,
    pub partial: AtomicU64,
    pub resume: AtomicU64,
}

/// `mixed`: 60% full exchanges, 30% partial exchanges (each with a direct
/// request), 10% resumed reconnects with login.
pub struct Mixed {
    pub session: Session,
    pub resume: Resume,
    pub counts: Arc<MixCounts>,
}

impl Op for Mixed {
    fn run(&mut self) -> Result<(), String> {
        let x: u32 = rand::rng().random_range(0..10);
        let (r, c) = match x {
            0..6 => (self.session.exchange(false), &self.counts.full),
            6..9 => (self.session.exchange(true), &self.counts.partial),
            _ => (self.resume.run(), &self.counts.resume),
        };
        if r.is_ok() {
            c.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}
