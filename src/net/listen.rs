//! One SO_REUSEPORT listener per core, built with socket2.
//!
//! SO_REUSEPORT lets any process of the same user join the port's group and
//! take a share of the connections. To keep a second instance from silently
//! sharing the port, a probe socket *without* SO_REUSEPORT binds first: it
//! fails if anything listens there already. Port 0 resolves through the
//! probe too, so every core gets the same ephemeral port.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;

/// Binds `n` listeners sharing one address; returns them and the address.
pub fn reuseport_group(
    addr: SocketAddr,
    n: usize,
    backlog: i32,
) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let domain = Domain::for_address(addr);
    let probe = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR passes TIME_WAIT leftovers of a previous run, never a listener.
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot bind {addr}: {e} (is another broker running?)"),
        )
    })?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet address"))?;
    drop(probe);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_tcp_nodelay(true)?;
        s.bind(&addr.into())?;
        s.listen(backlog)?;
        s.set_nonblocking(true)?;
        out.push(s.into());
    }
    Ok((out, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_group_on_same_port_is_refused() {
        let (first, addr) = reuseport_group("127.0.0.1:0".parse().unwrap(), 2, 16).unwrap();
        assert_eq!(first.len(), 2);
        assert_ne!(addr.port(), 0);
        let err = reuseport_group(addr, 1, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
