//! The PROXY protocol v2 header HAProxy sends first on each connection, so
//! the broker behind it still sees the terminal's address. Parsing is the
//! `ppp` crate's; this only reads enough bytes and hands back the rest.

use compio::BufResult;
use compio::io::AsyncRead;
use compio::net::TcpStream;
use ppp::PartialResult;
use ppp::v2::{Addresses, Header};
use std::io;
use std::net::SocketAddr;

/// The longest v2 header we accept (16 fixed bytes + addresses + TLVs).
const MAX_HEADER: usize = 536;

/// Reads a v2 header; returns the client's address (None for LOCAL, e.g.
/// HAProxy's health checks) and the bytes read past the header.
pub async fn read_header(sock: &mut TcpStream) -> io::Result<(Option<SocketAddr>, Vec<u8>)> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let parsed = Header::try_from(&buf[..]);
        match parsed {
            Ok(h) => {
                let addr = match h.addresses {
                    Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    _ => None,
                };
                let rest = buf[h.len()..].to_vec();
                return Ok((addr, rest));
            }
            Err(e) if e.is_incomplete() && buf.len() < MAX_HEADER => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("PROXY header: {e}"),
                ));
            }
        }
        let spare = std::mem::take(&mut buf);
        let before = spare.len();
        let mut spare = spare;
        spare.reserve(1024);
        let BufResult(r, b) = sock.read(spare).await;
        buf = b;
        if r? == 0 || buf.len() == before {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}
