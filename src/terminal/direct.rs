//! The terminal's side of the direct channel and of a brokered exchange.
//!
//! ```text
//! Brokered{session id, X, endpoint} ─► TCP ─► Hello{noise e} ─► HelloOk{noise e, ee} ─► Record ⇄ Record
//! ```

use super::TerminalError;
use crate::proto::ErrorCode;
use crate::proto::direct::{self, Channel, Decoder, Initiator};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;
use zeroize::Zeroizing;

/// A session key X agreed with a market, and where to use it.
pub struct Brokered {
    pub session_id: [u8; 16],
    pub x: Zeroizing<[u8; 32]>,
    pub endpoint: String,
    pub expiry_ms: u64,
}

impl std::fmt::Debug for Brokered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Brokered")
            .field("session_id", &hex::encode(self.session_id))
            .field("endpoint", &self.endpoint)
            .field("expiry_ms", &self.expiry_ms)
            .finish_non_exhaustive()
    }
}

/// An open direct channel to a market.
pub struct Direct {
    link: Link,
    channel: Channel,
}

fn refused(payload: &[u8]) -> TerminalError {
    let code = <[u8; 2]>::try_from(payload)
        .ok()
        .and_then(|b| ErrorCode::from_u16(u16::from_be_bytes(b)));
    match code {
        Some(code) => TerminalError::Refused {
            code,
            detail: format!("market: {code}"),
        },
        None => TerminalError::Protocol("malformed alert from the market".into()),
    }
}

/// A connected socket and its frame decoder, before the handshake.
struct Link {
    sock: TcpStream,
    decoder: Decoder,
}

impl Link {
    fn dial(endpoint: &str, timeout: Duration) -> Result<Self, TerminalError> {
        let addr = endpoint
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| TerminalError::Protocol(format!("bad endpoint {endpoint}")))?;
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.set_nodelay(true)?;
        Ok(Self {
            sock,
            decoder: Decoder::default(),
        })
    }

    fn next(&mut self) -> Result<(u8, Vec<u8>), TerminalError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(f) = self
                .decoder
                .next_frame()
                .map_err(|e| TerminalError::Protocol(e.to_string()))?
            {
                return Ok(f);
            }
            let n = self.sock.read(&mut buf)?;
            if n == 0 {
                return Err(TerminalError::Closed);
            }
            self.decoder.push(&buf[..n]);
        }
    }
}

impl Direct {
    /// Connects to the market and runs the handshake (Hello, HelloOk): one
    /// round trip. Requests go only after it, so none can be replayed on
    /// another connection (docs/PROTOCOL.md §3.2).
    pub fn connect(b: &Brokered, timeout: Duration) -> Result<Self, TerminalError> {
        let mut link = Link::dial(&b.endpoint, timeout)?;
        let mut hello = Vec::with_capacity(direct::HELLO_LEN + 5);
        let initiator = Initiator::start(&b.x, b.session_id, &mut hello);
        link.sock.write_all(&hello)?;
        let channel = match link.next()? {
            (direct::HELLO_OK, p) => initiator
                .finish(&p)
                .map_err(|e| TerminalError::Protocol(format!("market handshake: {e}")))?,
            (direct::ALERT, p) => return Err(refused(&p)),
            _ => return Err(TerminalError::Protocol("unexpected answer to hello".into())),
        };
        Ok(Self { link, channel })
    }

    /// Connects and sends the first request once the handshake is done;
    /// returns the channel and the market's answer (two round trips).
    pub fn open(
        b: &Brokered,
        timeout: Duration,
        request: &[u8],
    ) -> Result<(Self, Vec<u8>), TerminalError> {
        let mut d = Self::connect(b, timeout)?;
        let answer = d.request(request)?;
        Ok((d, answer))
    }

    /// Sends raw bytes (tests use this to send tampered records).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TerminalError> {
        self.link.sock.write_all(bytes)?;
        Ok(())
    }

    /// Seals `request` without sending it (tests tamper with it).
    pub fn seal(&mut self, request: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.channel.seal(request, &mut out);
        out
    }

    /// Reads and opens the market's next answer.
    pub fn receive(&mut self) -> Result<Vec<u8>, TerminalError> {
        match self.link.next()? {
            (direct::RECORD, p) => self
                .channel
                .open(&p)
                .map_err(|e| TerminalError::Protocol(format!("market record refused: {e}"))),
            (direct::ALERT, p) => Err(refused(&p)),
            _ => Err(TerminalError::Protocol("unexpected frame".into())),
        }
    }

    /// Presents a purchase receipt; the market answers with the decision id
    /// it accepted, or refuses.
    pub fn present_receipt(&mut self, receipt: &[u8]) -> Result<String, TerminalError> {
        let answer = self.request(&[crate::market::server::RECEIPT, receipt].concat())?;
        let text = String::from_utf8_lossy(&answer);
        text.strip_prefix("RECEIPT OK ")
            .map(str::to_owned)
            .ok_or_else(|| TerminalError::Protocol(format!("market: {text}")))
    }

    /// Asks the market to authorise cancelling `decision_id`: returns the
    /// encoded authorisation (docs/PROTOCOL.md §1.8), for `Terminal::cancel`.
    pub fn cancel_authorisation(&mut self, decision_id: &str) -> Result<Vec<u8>, TerminalError> {
        let req = [crate::market::server::CANCEL, decision_id.as_bytes()].concat();
        let answer = self.request(&req)?;
        let Some(body) = answer.strip_prefix(crate::market::server::CANCEL_AUTH) else {
            let text = String::from_utf8_lossy(&answer);
            return Err(TerminalError::Protocol(format!("market: {text}")));
        };
        let mut r = crate::proto::wire::Reader::new(body);
        let auth = r
            .bytes(crate::cancel_auth::MAX_ENCODED, "authorisation")
            .map_err(|_| TerminalError::Protocol("malformed cancellation authorisation".into()))?;
        Ok(auth.to_vec())
    }

    /// One encrypted request and its encrypted answer.
    pub fn request(&mut self, request: &[u8]) -> Result<Vec<u8>, TerminalError> {
        let rec = self.seal(request);
        self.send_raw(&rec)?;
        self.receive()
    }
}
