//! Per-source limits on connections that have not yet proved who they
//! are, for one core (no locks: each core keeps its own).
//!
//! ```text
//! accept ─► source (PROXY header's address, else the peer's; IPv6 by /64)
//!        ─► handshake bucket: a token per new connection  ── empty ─► refuse "source_rate"
//!        ─► pending < max_pending                          ── full  ─► refuse "source_pending"
//!        ─► Pending guard ─► handshake done: no longer pending
//!                         └► handshake timed out: TIMEOUT_COST more tokens off its source
//! ```
//!
//! The connection cap (`max_connections_per_core`) protects the process
//! but not its terminals: one host that keeps the whole cap in silent
//! connections, renewing them every handshake timeout, refused everyone
//! else. Per source, such a host holds at most `max_pending` connections a
//! core, and gets at most `rate` new ones a second; a handshake it lets
//! time out costs it more, so a slowloris source slows down by itself.
//!
//! A connection is pending until its handshake completes: on the access
//! port that is the TLS handshake, client certificate verified (from there
//! on the peer is an enrolled terminal, known by its certificate, and the
//! login and exchange limits are per terminal and per user); on the
//! market's direct port, the Noise Hello. IPv6 sources count by /64, the
//! block one host is usually given, so a host cannot dodge the limit by
//! cycling addresses of its own block.
//!
//! The limits are per core: a source's connections spread over the cores
//! can hold `cores × max_pending`. Sharing one table between cores would
//! put a lock on every accept for a factor of the core count. The refusal
//! log lines are throttled for the whole process.

use crate::limits::{Buckets, Rate};
use crate::logs::KeyedThrottle;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::rc::Rc;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// Tokens a timed-out handshake takes from its source, on top of the one
/// its connection took.
pub const TIMEOUT_COST: u32 = 4;
/// Sources whose handshake rate is followed per core. Past this the oldest
/// unused are forgotten (`limits::Buckets`).
const MAX_TRACKED: usize = 65_536;
/// One line per source and reason per interval; at most `LOG_SOURCES`
/// sources followed apart, the rest share one line an interval.
const LOG_EVERY: Duration = Duration::from_secs(10);
const LOG_SOURCES: usize = 64;

#[derive(Clone, Copy, Debug)]
pub struct SourceLimits {
    /// Pending connections per source on a core; 0: no limit.
    pub max_pending: u32,
    /// New connections per source on a core.
    pub rate: Rate,
}

impl SourceLimits {
    /// The per-source limits of the access port.
    pub fn of(b: &crate::config::BrokerConfig) -> Self {
        Self {
            max_pending: b.max_pending_per_source,
            rate: Rate {
                per_s: b.handshakes_per_source_per_s,
                burst: b.handshake_burst_per_source,
            },
        }
    }
}

/// A source address as the limits count it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: Option<IpAddr>) -> Self {
        let ip = ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        Self(match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
            v4 => v4,
        })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// Why a source was refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It has `max_pending` connections in their handshake already.
    Pending,
    /// It opened connections faster than its rate.
    Rate,
}

impl Refused {
    /// The reason label of `keybroker_handshake_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Pending => "source_pending",
            Self::Rate => "source_rate",
        }
    }
}

/// One core's view of the sources connecting to one listener.
pub struct Sources {
    limits: std::cell::Cell<SourceLimits>,
    pending: RefCell<HashMap<Source, u32>>,
    rate: RefCell<Buckets<Source>>,
}

/// Refusal log lines, one per source and reason per interval, for the
/// whole process: a scan spread over the cores still shows once. Taken
/// only to log a refusal, for a map operation.
static REFUSALS: LazyLock<Mutex<KeyedThrottle<(Source, &'static str)>>> =
    LazyLock::new(|| Mutex::new(KeyedThrottle::new(LOG_EVERY, LOG_SOURCES)));

impl Sources {
    pub fn new(limits: SourceLimits) -> Rc<Self> {
        Rc::new(Self {
            limits: std::cell::Cell::new(limits),
            pending: RefCell::default(),
            rate: RefCell::new(Buckets::new(limits.rate, MAX_TRACKED)),
        })
    }

    /// Admits a new connection from `source`, pending until the guard is
    /// told it is done or dropped.
    pub fn admit(self: &Rc<Self>, source: Source, now_ms: u64) -> Result<Pending, Refused> {
        self.rate
            .borrow_mut()
            .take(&source, 1, now_ms)
            .map_err(|_| Refused::Rate)?;
        let mut pending = self.pending.borrow_mut();
        let n = pending.entry(source).or_insert(0);
        let max = self.limits.get().max_pending;
        if max != 0 && *n >= max {
            return Err(Refused::Pending);
        }
        *n += 1;
        Ok(Pending {
            sources: self.clone(),
            source,
            counted: true,
        })
    }

    /// New limits (a reloaded config), for the next connections.
    pub fn set_limits(&self, limits: SourceLimits) {
        self.limits.set(limits);
        self.rate.borrow_mut().set_rate(limits.rate);
    }

    /// Whether to log a refusal of `source` for `reason` now: `Some(n)`
    /// with the number held back since the last line.
    pub fn log_refusal(&self, source: Source, reason: &'static str, now_ms: u64) -> Option<u64> {
        REFUSALS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pass((source, reason), now_ms)
    }

    fn release(&self, source: Source) {
        let mut pending = self.pending.borrow_mut();
        if let Some(n) = pending.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&source);
            }
        }
    }

    /// Pending connections of `source` now.
    pub fn pending(&self, source: Source) -> u32 {
        self.pending.borrow().get(&source).copied().unwrap_or(0)
    }
}

/// A connection counted as pending against its source.
pub struct Pending {
    sources: Rc<Sources>,
    source: Source,
    counted: bool,
}

impl Pending {
    pub fn source(&self) -> Source {
        self.source
    }

    /// The handshake completed: the connection no longer counts.
    pub fn done(mut self) {
        self.uncount();
    }

    /// The handshake ran out of time: its source pays [`TIMEOUT_COST`].
    pub fn timed_out(mut self, now_ms: u64) {
        self.sources
            .rate
            .borrow_mut()
            .drain(&self.source, TIMEOUT_COST, now_ms);
        self.uncount();
    }

    fn uncount(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.sources.release(self.source);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.uncount();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Source {
        Source::of(Some(s.parse().unwrap()))
    }

    fn sources(max_pending: u32, per_s: u32, burst: u32) -> Rc<Sources> {
        Sources::new(SourceLimits {
            max_pending,
            rate: Rate { per_s, burst },
        })
    }

    #[test]
    fn a_source_holds_at_most_max_pending_and_others_are_apart() {
        let s = sources(2, 1000, 1000);
        let a = ip("127.0.0.2");
        let held: Vec<_> = (0..2).map(|_| s.admit(a, 0).unwrap()).collect();
        assert_eq!(s.admit(a, 0).err(), Some(Refused::Pending));
        let b = s.admit(ip("127.0.0.1"), 0).unwrap();
        drop(held);
        assert_eq!(s.pending(a), 0);
        s.admit(a, 0).unwrap().done();
        b.done();
        assert!(s.pending.borrow().is_empty(), "no entry left behind");
    }

    #[test]
    fn new_connections_are_rate_limited_and_a_timeout_costs_more() {
        let s = sources(0, 10, 5);
        let a = ip("10.0.0.1");
        for _ in 0..5 {
            s.admit(a, 0).unwrap().done();
        }
        assert_eq!(s.admit(a, 0).err(), Some(Refused::Rate));
        // 1 s later the bucket is full again (5); a timed-out handshake
        // takes its own token and TIMEOUT_COST more.
        s.admit(a, 1000).unwrap().timed_out(1000);
        assert_eq!(s.admit(a, 1000).err(), Some(Refused::Rate));
    }

    #[test]
    fn ipv6_sources_count_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::2"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:127.0.0.2"), ip("127.0.0.2"));
        assert_eq!(ip("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }
}
