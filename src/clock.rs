//! Wall-clock time: the one place that reads it. Monotonic time for rates
//! and timeouts is `limits::mono_ms` (and `Instant`, passed into the
//! sans-IO cores as a value).
//!
//! Code that stamps what it stores (the ledger) takes a [`Clock`], so the
//! simulation (tests/sim.rs) can run it on a clock it sets and jumps,
//! backwards too. The rest reads [`now`] through the free functions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where wall-clock time comes from.
pub trait Clock: Send + Sync {
    /// Since the Unix epoch (zero for a time before 1970).
    fn now(&self) -> Duration;

    /// In ms, as the protocols and the ledger carry it.
    fn now_ms(&self) -> i64 {
        i64::try_from(self.now().as_millis()).unwrap_or(i64::MAX)
    }
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({:?})", self.now())
    }
}

/// The host's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// The host's clock, shared.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// A clock that moves only when told: the simulation's.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn at(t: Duration) -> Self {
        Self(AtomicU64::new(t.as_micros() as u64))
    }

    pub fn set(&self, t: Duration) {
        self.0.store(t.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::SeqCst))
    }
}

/// Now, since the Unix epoch.
pub fn now() -> Duration {
    SystemClock.now()
}

/// Now, in ms since the Unix epoch (0 for a clock before 1970).
pub fn now_ms() -> u64 {
    now().as_millis() as u64
}
