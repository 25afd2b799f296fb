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
/// With `steer`, the kernel hands a new connection to listener `cpu % n`,
/// `cpu` being the CPU that took its SYN (`net::cores`).
pub fn reuseport_group(
    addr: SocketAddr,
    n: usize,
    backlog: i32,
    steer: bool,
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
        if steer && out.is_empty() {
            steer_by_cpu(&s, n)?;
        }
        out.push(s.into());
    }
    Ok((out, addr))
}

/// Attaches `A = cpu; A %= n; return A` to the reuseport group of `s`.
fn steer_by_cpu(s: &Socket, n: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // Classic BPF opcodes (linux/filter.h): BPF_LD|BPF_W|BPF_ABS,
    // BPF_ALU|BPF_MOD|BPF_K, BPF_RET|BPF_A.
    const LD_W_ABS: u16 = 0x20;
    const ALU_MOD_K: u16 = 0x94;
    const RET_A: u16 = 0x16;
    let op = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut code = [
        op(LD_W_ABS, (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32),
        op(ALU_MOD_K, n.max(1) as u32),
        op(RET_A, 0),
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    #[allow(unsafe_code)]
    // SAFETY: a valid socket; `prog` and the code it points to outlive the
    // call, which copies them into the kernel.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_group_on_same_port_is_refused() {
        let (first, addr) = reuseport_group("127.0.0.1:0".parse().unwrap(), 2, 16, true).unwrap();
        assert_eq!(first.len(), 2);
        assert_ne!(addr.port(), 0);
        let err = reuseport_group(addr, 1, 16, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_steered_group_hands_each_connection_to_the_listener_of_its_cpu() {
        let allowed = rustix::thread::sched_getaffinity(None).unwrap();
        if !(allowed.is_set(0) && allowed.is_set(1)) {
            return; // a runner confined to one CPU cannot show it
        }
        let (ls, addr) = reuseport_group("127.0.0.1:0".parse().unwrap(), 2, 16, true).unwrap();
        for cpu in [1usize, 0, 1] {
            let client = std::thread::spawn(move || {
                let mut one = rustix::thread::CpuSet::new();
                one.set(cpu);
                rustix::thread::sched_setaffinity(None, &one).unwrap();
                std::net::TcpStream::connect(addr).unwrap()
            })
            .join()
            .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let got = loop {
                if let Some(i) = ls.iter().position(|l| l.accept().is_ok()) {
                    break i;
                }
                assert!(std::time::Instant::now() < deadline, "never accepted");
                std::thread::sleep(std::time::Duration::from_millis(1));
            };
            assert_eq!(got, cpu, "accepted by the listener of the client's CPU");
            drop(client);
        }
    }
}
