//! The loopback transport floor: what this machine's kernel charges a
//! server for the TCP a session or an exchange cannot avoid, with no TLS and
//! no application code at all.
//!
//! The crypto floor (floor.rs) leaves the network out, and on this VM the
//! network is not small: a resumed session's three round trips, its accept
//! and its close cost about as much server CPU as its handshake. So the
//! floor process also runs a bare epoll server on two threads (one per
//! CPU, as the broker's cores) against blocking clients, and reports the
//! server threads' CPU per operation. A figure that needs the broker to
//! beat `crypto floor + transport floor` cannot be reached by any code of
//! ours on this machine; docs/BENCH.md, "The floor", says which one.

use anyhow::{Context, Result};
use rustix::buffer::spare_capacity;
use rustix::event::{Timespec, epoll};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shape of one operation, as the broker sees it on the wire.
#[derive(Clone, Copy)]
pub enum Shape {
    /// Accept, three request/answer round trips sized like a resumed TLS
    /// session (ClientHello → server flight; Finished + Login → ticket +
    /// answer; Logout → Bye + close_notify), then shutdown and close.
    Session,
    /// One request/answer on a kept connection, sized like an exchange.
    RoundTrip,
}

const SESSION: [(usize, usize); 3] = [(520, 250), (160, 300), (60, 60)];
const ROUND_TRIP: (usize, usize) = (120, 250);
const LISTENER: u64 = u64::MAX;
/// Server threads, one pinned to each CPU, as the broker's cores here.
pub const SERVER_THREADS: usize = 2;
/// How long a client waits on the server before it gives up with an error.
const PATIENCE: Duration = Duration::from_secs(2);

impl Shape {
    /// (request, answer) bytes of step `i`.
    fn step(self, i: usize) -> (usize, usize) {
        match self {
            Shape::Session => SESSION[i],
            Shape::RoundTrip => ROUND_TRIP,
        }
    }
}

struct Conn {
    stream: TcpStream,
    step: usize,
    got: usize,
}

/// One server thread: its own epoll over the shared listener (exclusive
/// wake-ups) and the connections it accepted. Counts finished operations.
fn serve(listener: &TcpListener, shape: Shape, stop: &AtomicBool, done: &AtomicU64) -> Result<()> {
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &ep,
        listener,
        epoll::EventData::new_u64(LISTENER),
        epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE,
    )?;
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next = 0u64;
    let mut events = Vec::with_capacity(64);
    let mut buf = vec![0u8; 4096];
    let answer = vec![7u8; 512];
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: 20_000_000,
    };
    while !stop.load(Ordering::Relaxed) {
        events.clear();
        epoll::wait(&ep, spare_capacity(&mut events), Some(&tick))?;
        for ev in &events {
            let id = ev.data.u64();
            if id == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    stream.set_nodelay(true)?;
                    epoll::add(
                        &ep,
                        &stream,
                        epoll::EventData::new_u64(next),
                        epoll::EventFlags::IN,
                    )?;
                    conns.insert(
                        next,
                        Conn {
                            stream,
                            step: 0,
                            got: 0,
                        },
                    );
                    next += 1;
                }
                continue;
            }
            let Some(c) = conns.get_mut(&id) else {
                continue;
            };
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    conns.remove(&id);
                    continue;
                }
                Ok(n) => c.got += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(_) => {
                    conns.remove(&id);
                    continue;
                }
            }
            let (req, ans) = shape.step(c.step);
            if c.got < req {
                continue;
            }
            c.got = 0;
            // A few hundred bytes into an empty loopback socket: never short.
            c.stream.write_all(&answer[..ans])?;
            match shape {
                Shape::RoundTrip => {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Shape::Session => {
                    c.step += 1;
                    if c.step == SESSION.len() {
                        let _ = c.stream.shutdown(Shutdown::Write);
                        conns.remove(&id);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    Ok(())
}

/// One blocking client: sessions back to back, or round trips on one
/// connection, until `stop`.
fn client(addr: SocketAddr, shape: Shape, stop: &AtomicBool) -> Result<()> {
    let request = vec![1u8; 1024];
    let mut buf = vec![0u8; 4096];
    let exchange = |s: &mut TcpStream, i: usize, buf: &mut [u8]| -> Result<()> {
        let (req, ans) = shape.step(i);
        s.write_all(&request[..req])?;
        s.read_exact(&mut buf[..ans])?;
        Ok(())
    };
    let open = || -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, PATIENCE)?;
        s.set_nodelay(true)?;
        // A server thread that failed must not leave the floor hanging.
        s.set_read_timeout(Some(PATIENCE))?;
        s.set_write_timeout(Some(PATIENCE))?;
        Ok(s)
    };
    match shape {
        Shape::RoundTrip => {
            let mut s = open()?;
            while !stop.load(Ordering::Relaxed) {
                exchange(&mut s, 0, &mut buf)?;
            }
        }
        Shape::Session => {
            while !stop.load(Ordering::Relaxed) {
                let mut s = open()?;
                for i in 0..SESSION.len() {
                    exchange(&mut s, i, &mut buf)?;
                }
                // The server's FIN.
                let _ = s.read(&mut buf)?;
            }
        }
    }
    Ok(())
}

fn pin_to(cpu: usize) {
    let allowed = rustix::thread::sched_getaffinity(None);
    if let Ok(allowed) = allowed
        && allowed.is_set(cpu)
    {
        let mut one = rustix::thread::CpuSet::new();
        one.set(cpu);
        let _ = rustix::thread::sched_setaffinity(None, &one);
    }
}

/// Server CPU per operation over one run.
pub struct Measured {
    /// The median window's µs per op.
    pub us: f64,
    /// Half the range of the windows (without the two extremes when there
    /// are five or more), relative to the median, in %.
    pub spread_pct: f64,
}

/// Server CPU per operation: `windows` windows of `window` each, after
/// `warm`, with `clients` blocking clients.
pub fn measure(
    shape: Shape,
    clients: usize,
    warm: Duration,
    window: Duration,
    windows: usize,
) -> Result<Measured> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let stop_servers = AtomicBool::new(false);
    let stop_clients = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let pid = std::process::id();
    std::thread::scope(|sc| -> Result<Measured> {
        let mut servers = Vec::new();
        for cpu in 0..SERVER_THREADS {
            let (l, stop, done) = (&listener, &stop_servers, &done);
            servers.push(
                std::thread::Builder::new()
                    .name(format!("tport-{cpu}"))
                    .spawn_scoped(sc, move || {
                        pin_to(cpu);
                        serve(l, shape, stop, done)
                    })?,
            );
        }
        let mut cls = Vec::new();
        for _ in 0..clients {
            let stop = &stop_clients;
            cls.push(sc.spawn(move || client(addr, shape, stop)));
        }
        std::thread::sleep(warm);
        let mut per_op = Vec::with_capacity(windows);
        for _ in 0..windows {
            let (c0, n0, t0) = (
                crate::procs::cpu_snap(pid),
                done.load(Ordering::Relaxed),
                Instant::now(),
            );
            while t0.elapsed() < window {
                std::thread::sleep(Duration::from_millis(10));
            }
            let d = crate::procs::cpu_delta(&c0, &crate::procs::cpu_snap(pid));
            let ops = done.load(Ordering::Relaxed) - n0;
            per_op.push(crate::report::us_per_op(d.group("tport"), ops));
        }
        stop_clients.store(true, Ordering::Relaxed);
        let client_results: Vec<Result<()>> = cls
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect();
        stop_servers.store(true, Ordering::Relaxed);
        for s in servers {
            s.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("server panicked")))
                .context("transport server")?;
        }
        for r in client_results {
            r.context("transport client")?;
        }
        per_op.sort_by(f64::total_cmp);
        let us = per_op[per_op.len() / 2];
        let trim = usize::from(per_op.len() >= 5);
        let kept = &per_op[trim..per_op.len() - trim];
        Ok(Measured {
            us,
            spread_pct: (kept[kept.len() - 1] - kept[0]) / 2.0 / us * 100.0,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_cost_the_server_something() {
        let ms = Duration::from_millis;
        for shape in [Shape::Session, Shape::RoundTrip] {
            let us = measure(shape, 4, ms(50), ms(150), 1).unwrap().us;
            // A loopback round trip costs a server microseconds, not zero
            // and not milliseconds; zero would mean the CPU went unread.
            assert!(us > 0.5 && us < 5_000.0, "{us} µs per op");
        }
    }
}
