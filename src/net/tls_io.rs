//! rustls driven over a compio (io_uring) TCP stream.
//!
//! ```text
//! socket ──read(owned buf)──► conn.read_tls ──► process_new_packets ──► conn.reader ──► plaintext
//! plaintext ──► conn.writer ──► conn.write_tls(owned buf) ──write_all──► socket
//! ```
//!
//! We drive rustls ourselves instead of going through a wrapper crate so the
//! broker can reach the connection itself: the X' exporter, the peer
//! certificate, and the session ticket state. Buffers are owned and reused
//! across reads and writes, as io_uring needs.

use compio::BufResult;
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::TcpStream;
use rustls::ConnectionCommon;
use rustls::SideData;
use std::io::{self, Read, Write};
use std::ops::DerefMut;

const READ_BUF: usize = 16 * 1024 + 512;

pub struct TlsIo<C> {
    pub sock: TcpStream,
    pub conn: C,
    rbuf: Option<Vec<u8>>,
    wbuf: Option<Vec<u8>>,
    /// A server's session tickets are queued but not yet sent: they leave
    /// with the first response instead of in a send of their own.
    tickets_held: bool,
}

impl<C, D> TlsIo<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    pub fn new(sock: TcpStream, conn: C) -> Self {
        Self {
            sock,
            conn,
            rbuf: None,
            wbuf: None,
            tickets_held: false,
        }
    }

    /// Feeds bytes already read from the socket (after a PROXY header).
    pub fn preload(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.conn.read_tls(&mut bytes)?;
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        Ok(())
    }

    /// Writes every pending TLS record to the socket.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.tickets_held = false;
        while self.conn.wants_write() {
            let mut w = self.wbuf.take().unwrap_or_default();
            w.clear();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut w)?;
            }
            let BufResult(r, w) = self.sock.write_all(w).await;
            self.wbuf = Some(w);
            r?;
        }
        Ok(())
    }

    /// Reads from the socket into rustls. `Ok(false)` at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        let mut b = self
            .rbuf
            .take()
            .unwrap_or_else(|| Vec::with_capacity(READ_BUF));
        b.clear();
        let BufResult(r, b) = self.sock.read(b).await;
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                self.rbuf = Some(b);
                return Err(e);
            }
        };
        let mut rest = &b[..n];
        let mut result = Ok(n > 0);
        while !rest.is_empty() {
            if let Err(e) = self.conn.read_tls(&mut rest) {
                result = Err(e);
                break;
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Send the alert rustls queued, then fail.
                let _ = self.flush().await;
                result = Err(io::Error::new(io::ErrorKind::InvalidData, e));
                break;
            }
        }
        self.rbuf = Some(b);
        result
    }

    /// Runs the handshake's flights; what rustls queues after the last
    /// one is left unsent.
    async fn flights(&mut self) -> io::Result<()> {
        while self.conn.is_handshaking() {
            self.flush().await?;
            if self.conn.is_handshaking() && self.conn.wants_read() && !self.fill().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Completes the TLS handshake.
    pub async fn handshake(&mut self) -> io::Result<()> {
        self.flights().await?;
        self.flush().await
    }

    /// Completes a server's TLS handshake but keeps the session tickets
    /// rustls queues after it for the first response: the client does not
    /// wait for them, and one loopback send fewer per session is about a
    /// tenth of a resumption's CPU on the broker.
    pub async fn accept(&mut self) -> io::Result<()> {
        self.flights().await?;
        self.tickets_held = self.conn.wants_write();
        Ok(())
    }

    /// Reads plaintext into `buf`. `Ok(0)` when the peer has closed.
    pub async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let more = self.fill().await?;
                    // Post-handshake messages (key updates) may need answers;
                    // held tickets wait for the first response.
                    if !self.tickets_held {
                        self.flush().await?;
                    }
                    if !more {
                        return Ok(0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts and sends `data`.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.queue(data)?;
        self.flush().await
    }

    /// Encrypts `data` for the next [`TlsIo::flush`] (or `close`).
    pub fn queue(&mut self, data: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(data)
    }

    /// Sends close_notify and shuts the socket down.
    ///
    /// The shutdown is a plain `shutdown(2)`, not an io_uring op: io_uring
    /// never issues a shutdown inline but hands it to an io-wq worker
    /// thread, and that thread's wake-up and context switches cost about 6%
    /// of the broker's CPU per resumed session. On a non-blocking TCP
    /// socket the call only queues the FIN, so it cannot stall the core.
    ///
    /// The socket is corked first, so the FIN leaves in the same segment as
    /// the last records instead of in a packet of its own.
    pub async fn close(mut self) {
        self.conn.send_close_notify();
        let _ = socket2::SockRef::from(&self.sock).set_tcp_cork(true);
        let _ = self.flush().await;
        let _ = socket2::SockRef::from(&self.sock).shutdown(std::net::Shutdown::Write);
    }
}

/// The one crypto provider of every TLS endpoint here (broker, market,
/// terminal, bench floor): aws-lc-rs with TLS 1.3 suites only,
/// AES-128-GCM-SHA256 first. SHA-256 runs on the CPU's SHA extensions while
/// SHA-384 does not (aws-lc's `sha512_block_data_order_nohw`); with SHA-384
/// first, a handshake's key schedule and transcript hashing took 8% of the
/// core threads' CPU under the `connect` bench (docs/DECISIONS.md).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    std::sync::Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}
