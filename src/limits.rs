//! Token buckets, alone and by key, with time passed in (sans-IO: the
//! tests drive them with a made-up clock).
//!
//! ```text
//! take(key, now) ─► bucket of key (a fresh one is full) ─► refill by elapsed time ─► Ok | Err(wait_ms)
//! ```
//!
//! What they bound: handshakes per source address (`net::sources`), logins
//! per terminal and exchanges per user (`broker`). A bucket holds `burst`
//! tokens and gains `per_s` a second, so a peer may send a burst after a
//! pause but no more than `per_s` a second for long. Its refusal says how
//! long to wait, which becomes the `busy` answer's retry hint.
//!
//! [`Buckets`] keeps two generations of keys, each at most half its bound:
//! when the current one fills up, the older one is dropped, and a key used
//! in neither starts again with a full bucket. A key that keeps being used
//! keeps its state (it moves to the current generation on each use), so
//! memory is bounded and only a key idle for a whole generation is
//! forgotten, when forgetting it costs nothing: its bucket had refilled, or
//! it comes back with at most one burst. (A hand-written 60 lines instead of
//! the `governor` crate: the buckets here live inside a core's state or
//! under a lock the caller already holds, and take the caller's clock.)

use std::collections::HashMap;
use std::hash::Hash;

/// A rate: `per_s` tokens a second, at most `burst` saved up. `per_s = 0`
/// turns the limit off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_s: u32,
    pub burst: u32,
}

impl Rate {
    pub fn off(&self) -> bool {
        self.per_s == 0
    }
}

/// Tokens are counted in thousandths, so a slow rate still refills each ms.
const MILLI: u64 = 1000;

#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    milli: u64,
    at_ms: u64,
}

impl Bucket {
    pub fn full(rate: Rate, now_ms: u64) -> Self {
        Self {
            milli: u64::from(rate.burst.max(1)) * MILLI,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: Rate, now_ms: u64) {
        let cap = u64::from(rate.burst.max(1)) * MILLI;
        // Per ms, `per_s` thousandths of a token.
        let gained = now_ms.saturating_sub(self.at_ms) * u64::from(rate.per_s);
        self.milli = self.milli.saturating_add(gained).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Takes `n` tokens, or says how many ms until there are that many.
    pub fn take(&mut self, rate: Rate, n: u32, now_ms: u64) -> Result<(), u64> {
        if rate.off() {
            return Ok(());
        }
        self.refill(rate, now_ms);
        let need = u64::from(n) * MILLI;
        if self.milli >= need {
            self.milli -= need;
            return Ok(());
        }
        Err((need - self.milli).div_ceil(u64::from(rate.per_s)).max(1))
    }

    /// Takes up to `n` tokens without refusing: a penalty.
    pub fn drain(&mut self, rate: Rate, n: u32, now_ms: u64) {
        self.refill(rate, now_ms);
        self.milli = self.milli.saturating_sub(u64::from(n) * MILLI);
    }
}

/// A bucket per key, at most `max` keys held (two generations of `max / 2`).
pub struct Buckets<K> {
    rate: Rate,
    cur: HashMap<K, Bucket>,
    old: HashMap<K, Bucket>,
    half: usize,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: Rate, max: usize) -> Self {
        Self {
            rate,
            cur: HashMap::new(),
            old: HashMap::new(),
            half: (max / 2).max(1),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// A new rate (a reloaded config): buckets keep what they hold, and
    /// fill to the new burst at the new rate.
    pub fn set_rate(&mut self, rate: Rate) {
        self.rate = rate;
    }

    fn bucket<Q>(&mut self, key: &Q, now_ms: u64) -> &mut Bucket
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.cur.contains_key(key) {
            let b = self
                .old
                .remove(key)
                .unwrap_or_else(|| Bucket::full(self.rate, now_ms));
            if self.cur.len() >= self.half {
                self.old = std::mem::take(&mut self.cur);
            }
            self.cur.insert(key.to_owned(), b);
        }
        self.cur.get_mut(key).expect("inserted above")
    }

    /// Takes `n` tokens from `key`'s bucket, or says how long to wait.
    pub fn take<Q>(&mut self, key: &Q, n: u32, now_ms: u64) -> Result<(), u64>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if self.rate.off() {
            return Ok(());
        }
        let rate = self.rate;
        self.bucket(key, now_ms).take(rate, n, now_ms)
    }

    /// Takes up to `n` tokens from `key`'s bucket without refusing.
    pub fn drain<Q>(&mut self, key: &Q, n: u32, now_ms: u64)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.rate.off() {
            let rate = self.rate;
            self.bucket(key, now_ms).drain(rate, n, now_ms);
        }
    }

    /// Keys held now (both generations).
    pub fn len(&self) -> usize {
        self.cur.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Milliseconds on a monotonic clock (since the first call in this process).
pub fn mono_ms() -> u64 {
    static START: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    START.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Rate = Rate {
        per_s: 10,
        burst: 3,
    };

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate_and_says_how_long_to_wait() {
        let mut b = Bucket::full(R, 0);
        for _ in 0..3 {
            b.take(R, 1, 0).unwrap();
        }
        // 10 a second: the next token in 100 ms.
        assert_eq!(b.take(R, 1, 0), Err(100));
        assert_eq!(b.take(R, 1, 60), Err(40));
        b.take(R, 1, 100).unwrap();
        // A long pause saves up no more than the burst.
        for _ in 0..3 {
            b.take(R, 1, 60_000).unwrap();
        }
        assert!(b.take(R, 1, 60_000).is_err());
    }

    #[test]
    fn a_penalty_empties_the_bucket_without_refusing() {
        let mut b = Bucket::full(R, 0);
        b.drain(R, 10, 0);
        assert_eq!(b.take(R, 1, 0), Err(100));
    }

    #[test]
    fn rate_zero_is_no_limit() {
        let off = Rate { per_s: 0, burst: 0 };
        let mut k: Buckets<u32> = Buckets::new(off, 4);
        for _ in 0..1000 {
            k.take(&1, 1, 0).unwrap();
        }
        assert!(k.is_empty());
    }

    #[test]
    fn keys_are_apart_and_memory_is_bounded() {
        let mut k: Buckets<u32> = Buckets::new(R, 8);
        for _ in 0..3 {
            k.take(&1, 1, 0).unwrap();
        }
        assert!(k.take(&1, 1, 0).is_err());
        k.take(&2, 1, 0).unwrap();
        // Many other keys: at most 8 held, and key 1, used all along,
        // keeps its empty bucket.
        for other in 100..10_000u32 {
            k.take(&other, 1, 0).unwrap();
            assert!(k.len() <= 8);
            if other % 3 == 0 {
                assert!(k.take(&1, 1, 0).is_err(), "key 1 was forgotten");
            }
        }
    }
}
