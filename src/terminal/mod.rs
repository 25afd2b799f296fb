//! The terminal side of the access channel: connect, log in, release, X'.
//!
//! ```text
//! Identity::load(dir) ─► TerminalConfig (rustls client, ticket cache)
//!   ─► Terminal::connect ─► TLS 1.3 + client cert ─► X' = two exporter values
//!   ─► login(first password) ─► check LoginOk.confirm = HMAC(X'confirm, label)
//!   ─► release(second password) ─► exchange: unwrap X with X'wrap
//! ```
//!
//! Blocking std sockets: a terminal holds one session, and the CLI, the
//! tests and the demo read best this way. Any TLS 1.3 stack can replace it
//! (docs/PROTOCOL.md is the whole contract).

pub mod direct;

pub use direct::{Brokered, Direct};

use crate::crypto::AccessKeys;
use crate::exchange::{Ephemeral, Group};
use crate::proto::ErrorCode;
use crate::proto::access::{self, Frame, FrameDecoder, Message, Password};
use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TerminalError {
    /// The broker answered with a typed error.
    #[error("broker refused: {code}: {detail}")]
    Refused { code: ErrorCode, detail: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the broker closed the connection")]
    Closed,
}

impl TerminalError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A terminal's key, certificate and the broker CA, as written by
/// `keybroker terminal enroll`.
#[derive(Clone)]
pub struct TerminalConfig {
    pub client: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl TerminalConfig {
    /// Reads `terminal.key`, `terminal.crt` and `broker-ca.crt` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |f: &str| {
            std::fs::read(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()))
        };
        let certs = crate::pki::certs_pem(&read("terminal.crt")?)?;
        let key = crate::pki::private_key_pem(&read("terminal.key")?).context("terminal.key")?;
        let mut roots = RootCertStore::empty();
        for ca in crate::pki::certs_pem(&read("broker-ca.crt")?)? {
            roots.add(ca)?;
        }
        Self::new(roots, Some((certs, key)))
    }

    /// `identity`: None builds a client that presents no certificate
    /// (only useful to test that the broker refuses it).
    pub fn new(
        roots: RootCertStore,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> anyhow::Result<Self> {
        let b = ClientConfig::builder_with_provider(crate::net::tls_io::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let cfg = match identity {
            Some((certs, key)) => b.with_client_auth_cert(certs, key)?,
            None => b.with_no_client_auth(),
        };
        Ok(Self {
            client: Arc::new(cfg),
            server_name: ServerName::try_from("localhost").expect("valid name"),
        })
    }
}

/// Runs the client's flights but leaves its Finished queued for the caller
/// to flush, alone or with the first request. (TLS 1.3 lets a client send
/// data right behind its Finished; a refused client certificate shows on the
/// first read either way.)
fn handshake(tls: &mut StreamOwned<ClientConnection, TcpStream>) -> Result<(), TerminalError> {
    while tls.conn.is_handshaking() {
        if tls.conn.wants_write() {
            tls.conn.write_tls(&mut tls.sock)?;
            continue;
        }
        if tls.conn.read_tls(&mut tls.sock)? == 0 {
            return Err(TerminalError::Closed);
        }
        if let Err(e) = tls.conn.process_new_packets() {
            // Send the alert rustls queued, then fail.
            while tls.conn.wants_write() && tls.conn.write_tls(&mut tls.sock).is_ok() {}
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e).into());
        }
    }
    Ok(())
}

/// One access-channel session.
pub struct Terminal {
    tls: StreamOwned<ClientConnection, TcpStream>,
    keys: AccessKeys,
    decoder: FrameDecoder,
    next_id: u32,
    resumed: bool,
}

impl Terminal {
    /// Connects and completes the TLS handshake (resuming when the config
    /// holds a ticket from an earlier session with this broker). The
    /// connection may then wait: the broker's idle timeout applies, not its
    /// handshake timeout.
    pub fn connect(
        addr: SocketAddr,
        cfg: &TerminalConfig,
        timeout: Duration,
    ) -> Result<Self, TerminalError> {
        let mut t = Self::open(addr, cfg, timeout, None)?;
        t.tls.flush()?;
        Ok(t)
    }

    /// As [`Terminal::connect`], from the local address `from` (a host
    /// with several addresses; the tests use 127.0.0.2 as a second source).
    pub fn connect_from(
        from: std::net::IpAddr,
        addr: SocketAddr,
        cfg: &TerminalConfig,
        timeout: Duration,
    ) -> Result<Self, TerminalError> {
        let mut t = Self::open(addr, cfg, timeout, Some(from))?;
        t.tls.flush()?;
        Ok(t)
    }

    /// Connects and logs in with the first password at once: the client's
    /// TLS Finished leaves in the same segment as the login, one packet and
    /// one read fewer for the broker per session. For a terminal that logs
    /// in right away; one that waits for its user uses [`Terminal::connect`].
    pub fn connect_and_login(
        addr: SocketAddr,
        cfg: &TerminalConfig,
        timeout: Duration,
        user: &str,
        password: &[u8],
    ) -> Result<Self, TerminalError> {
        let mut t = Self::open(addr, cfg, timeout, None)?;
        t.login(user, password)?;
        Ok(t)
    }

    /// TCP, then the TLS handshake up to the client's Finished, queued.
    fn open(
        addr: SocketAddr,
        cfg: &TerminalConfig,
        timeout: Duration,
        from: Option<std::net::IpAddr>,
    ) -> Result<Self, TerminalError> {
        let sock = match from {
            None => TcpStream::connect_timeout(&addr, timeout)?,
            Some(ip) => {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                s.bind(&SocketAddr::new(ip, 0).into())?;
                s.connect_timeout(&addr.into(), timeout)?;
                s.into()
            }
        };
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.set_nodelay(true)?;
        let conn = ClientConnection::new(cfg.client.clone(), cfg.server_name.clone())
            .map_err(|e| TerminalError::Protocol(e.to_string()))?;
        let mut tls = StreamOwned::new(conn, sock);
        handshake(&mut tls)?;
        let resumed = tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let keys =
            AccessKeys::export(&*tls.conn).map_err(|e| TerminalError::Protocol(e.to_string()))?;
        Ok(Self {
            tls,
            keys,
            decoder: FrameDecoder::new(access::DEFAULT_MAX_FRAME),
            next_id: 1,
            resumed,
        })
    }

    /// X', the keys this terminal shares with the broker.
    pub fn keys(&self) -> &AccessKeys {
        &self.keys
    }

    /// Whether the TLS session was resumed from a ticket.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Sends raw bytes (tests use this to send malformed frames).
    ///
    /// Written past `StreamOwned`, whose write would first send whatever
    /// TLS is pending (a queued Finished) in a segment of its own: here the
    /// pending records and this one leave in one `writev`.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TerminalError> {
        self.tls.conn.writer().write_all(bytes)?;
        while self.tls.conn.wants_write() {
            self.tls.conn.write_tls(&mut self.tls.sock)?;
        }
        Ok(())
    }

    /// Reads the next frame from the broker.
    pub fn recv(&mut self) -> Result<Frame, TerminalError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self
                .decoder
                .next_frame()
                .map_err(|e| TerminalError::Protocol(e.to_string()))?
            {
                return Ok(f);
            }
            let n = match self.tls.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(TerminalError::Closed);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Sends one message and waits for its answer; typed errors become
    /// [`TerminalError::Refused`].
    pub fn call(&mut self, msg: Message) -> Result<Message, TerminalError> {
        let id = self.take_id();
        let mut out = zeroize::Zeroizing::new(Vec::new());
        access::encode(&Frame { id, msg }, &mut out);
        self.send_raw(&out)?;
        self.answer(id)
    }

    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// The next frame, which must answer request `id`. An error may also
    /// carry id 0: the broker's answer when no id could be read, or to
    /// silence (docs/PROTOCOL.md §1.3).
    fn answer(&mut self, id: u32) -> Result<Message, TerminalError> {
        let reply = self.recv()?;
        match reply.msg {
            Message::Error { code, detail } if reply.id == id || reply.id == 0 => {
                Err(TerminalError::Refused { code, detail })
            }
            _ if reply.id != id => Err(TerminalError::Protocol(format!(
                "answer for request {} while waiting for {id}",
                reply.id
            ))),
            m => Ok(m),
        }
    }

    /// Login with the first password; checks the broker's key confirmation.
    pub fn login(&mut self, user: &str, password: &[u8]) -> Result<(), TerminalError> {
        let answer = self.call(Message::Login {
            user: user.into(),
            password: Password::new(password.to_vec()),
        })?;
        self.logged_in(answer)
    }

    fn logged_in(&self, answer: Message) -> Result<(), TerminalError> {
        match answer {
            Message::LoginOk { confirm } => {
                if crate::crypto::ct_eq(&confirm, &self.keys.confirm()) {
                    Ok(())
                } else {
                    Err(TerminalError::Protocol(
                        "key confirmation mismatch: X' differs".into(),
                    ))
                }
            }
            other => Err(unexpected(other)),
        }
    }

    /// Opens a session and releases it in one flight: the TLS Finished,
    /// Login and Release leave together and the broker answers both at
    /// once, one round trip fewer than [`Terminal::connect_and_login`] then
    /// [`Terminal::release`]. The second password travels before the
    /// broker's key confirmation arrives, inside the same server-authenticated
    /// TLS session as the first; the confirmation is still checked before
    /// this returns. A refused login refuses the release too
    /// (`not_logged_in`), without checking its password.
    pub fn connect_and_release(
        addr: SocketAddr,
        cfg: &TerminalConfig,
        timeout: Duration,
        user: &str,
        first: &[u8],
        second: &[u8],
    ) -> Result<Self, TerminalError> {
        let mut t = Self::open(addr, cfg, timeout, None)?;
        let login = t.take_id();
        let release = t.take_id();
        let mut out = zeroize::Zeroizing::new(Vec::new());
        let login_msg = Message::Login {
            user: user.into(),
            password: Password::new(first.to_vec()),
        };
        access::encode(
            &Frame {
                id: login,
                msg: login_msg,
            },
            &mut out,
        );
        let release_msg = Message::Release {
            password: Password::new(second.to_vec()),
        };
        access::encode(
            &Frame {
                id: release,
                msg: release_msg,
            },
            &mut out,
        );
        t.send_raw(&out)?;
        let answer = t.answer(login)?;
        t.logged_in(answer)?;
        match t.answer(release)? {
            Message::ReleaseOk => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Release with the second password.
    pub fn release(&mut self, password: &[u8]) -> Result<(), TerminalError> {
        match self.call(Message::Release {
            password: Password::new(password.to_vec()),
        })? {
            Message::ReleaseOk => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Full proxy: the broker agrees X with `market` and sends it wrapped
    /// under X'wrap; this unwraps it.
    pub fn exchange(&mut self, market: &str) -> Result<Brokered, TerminalError> {
        match self.call(Message::Exchange {
            market: market.into(),
        })? {
            Message::ExchangeOk {
                session_id,
                expiry_ms,
                endpoint,
                wrapped_x,
            } => {
                let x =
                    crate::exchange::unwrap(self.keys.wrap_key(), &wrapped_x).ok_or_else(|| {
                        TerminalError::Protocol("wrapped X failed its integrity check".into())
                    })?;
                Ok(Brokered {
                    session_id,
                    x,
                    endpoint,
                    expiry_ms,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Partial proxy (claim 8): this terminal makes the ephemeral key and the
    /// ECDH; the broker only signs the transcript, so it never learns X.
    pub fn exchange_partial(&mut self, market: &str) -> Result<Brokered, TerminalError> {
        let eph = Ephemeral::generate(Group::X25519);
        match self.call(Message::ExchangePartial {
            market: market.into(),
            ephemeral: eph.public,
        })? {
            Message::PartialOk {
                session_id,
                expiry_ms,
                endpoint,
                market_ephemeral,
                transcript,
            } => {
                let x = eph
                    .x(&market_ephemeral, &transcript, &market_ephemeral)
                    .ok_or_else(|| TerminalError::Protocol("invalid market key".into()))?;
                Ok(Brokered {
                    session_id,
                    x,
                    endpoint,
                    expiry_ms,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Debits the wallet; returns (balance after, signed receipt bytes).
    /// A retry with the same `idempotency_key` returns the first decision.
    pub fn purchase(
        &mut self,
        market: &str,
        amount_minor: i64,
        currency: &str,
        order_ref: &str,
        idempotency_key: &str,
    ) -> Result<(i64, Vec<u8>), TerminalError> {
        let currency: [u8; 3] = currency
            .as_bytes()
            .try_into()
            .map_err(|_| TerminalError::Protocol("a currency code has 3 letters".into()))?;
        match self.call(Message::Purchase {
            market: market.into(),
            amount_minor,
            currency,
            order_ref: order_ref.into(),
            idempotency_key: idempotency_key.into(),
        })? {
            Message::PurchaseOk {
                balance_after,
                receipt,
            } => Ok((balance_after, receipt)),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels a decision with the market's authorisation; returns the balance after.
    pub fn cancel(
        &mut self,
        decision_id: &str,
        authorisation: Vec<u8>,
    ) -> Result<i64, TerminalError> {
        match self.call(Message::Cancel {
            decision_id: decision_id.into(),
            authorisation,
        })? {
            Message::WalletOk { balance_after } => Ok(balance_after),
            other => Err(unexpected(other)),
        }
    }

    /// Tops up with a voucher and the second password; returns the balance after.
    pub fn top_up(
        &mut self,
        voucher: &[u8],
        release_password: &[u8],
    ) -> Result<i64, TerminalError> {
        match self.call(Message::TopUp {
            voucher: voucher.to_vec(),
            password: Password::new(release_password.to_vec()),
        })? {
            Message::WalletOk { balance_after } => Ok(balance_after),
            other => Err(unexpected(other)),
        }
    }

    /// Balances by currency (minor units).
    pub fn balance(&mut self) -> Result<Vec<(String, i64)>, TerminalError> {
        match self.call(Message::Balance)? {
            Message::BalanceOk { balances } => Ok(balances
                .into_iter()
                .map(|(c, v)| (String::from_utf8_lossy(&c).into_owned(), v))
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    pub fn ping(&mut self) -> Result<(), TerminalError> {
        match self.call(Message::Ping)? {
            Message::Pong => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Ends the session cleanly.
    pub fn logout(mut self) -> Result<(), TerminalError> {
        match self.call(Message::Logout)? {
            Message::Bye => {
                self.tls.conn.send_close_notify();
                let _ = self.tls.flush();
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(m: Message) -> TerminalError {
    TerminalError::Protocol(format!("unexpected answer type 0x{:02x}", m.type_byte()))
}
