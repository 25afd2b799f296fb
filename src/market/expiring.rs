//! A bounded map whose entries expire, swept in expiry order.
//!
//! The market's sessions and replay nonces used to be plain maps that were
//! scanned whole (`retain`) once they reached `max_sessions`. At that size a
//! full map of live entries made every exchange scan a million entries under
//! the lock, only to answer `busy`. Here every entry is also queued in
//! insertion order; each insert first drops the expired entries at the front
//! of the queue, so the work is amortised O(1) and a full map answers at once.
//!
//! Entries are inserted with `now + a fixed lifetime`, so insertion order is
//! expiry order. If the clock steps back, a later entry may sit behind an
//! earlier one and outlive its expiry in memory until the one in front
//! expires; lookups still check the expiry, so it is never served.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Full of live entries.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

pub struct Expiring<K, V> {
    map: HashMap<K, (u64, V)>,
    /// (expiry, key) in insertion order. A key removed early stays here
    /// until its expiry; the sweep then finds the map's entry gone or newer.
    order: VecDeque<(u64, K)>,
    max: usize,
}

impl<K: Hash + Eq + Copy, V> Expiring<K, V> {
    pub fn new(max: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            max,
        }
    }

    /// Drops the entries expired at `now` (expiry <= now).
    fn sweep(&mut self, now: u64) {
        while let Some(&(expiry, key)) = self.order.front() {
            if expiry > now {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|(e, _)| *e == expiry) {
                self.map.remove(&key);
            }
        }
    }

    /// Inserts `key` until `expiry` and returns the live value it replaced,
    /// if any. `Full` when `max` live entries are held (nothing changes).
    pub fn insert(&mut self, key: K, value: V, expiry: u64, now: u64) -> Result<Option<V>, Full> {
        self.sweep(now);
        let live = self.map.get(&key).is_some_and(|(e, _)| *e > now);
        // The queue also holds the old slots of renewed keys: bounded too.
        if (!live && self.map.len() >= self.max) || self.order.len() >= 2 * self.max {
            return Err(Full);
        }
        self.order.push_back((expiry, key));
        Ok(self
            .map
            .insert(key, (expiry, value))
            .filter(|(e, _)| *e > now)
            .map(|(_, v)| v))
    }

    /// The live value of `key` and its expiry, `Err(())` when it has expired
    /// (it is dropped then), `Ok(None)` when unknown.
    pub fn get(&mut self, key: &K, now: u64) -> Result<Option<(&V, u64)>, ()> {
        self.get_mut(key, now).map(|o| o.map(|(v, e)| (&*v, e)))
    }

    /// As [`Expiring::get`], for a value to change in place.
    pub fn get_mut(&mut self, key: &K, now: u64) -> Result<Option<(&mut V, u64)>, ()> {
        if self.map.get(key).is_some_and(|(e, _)| *e <= now) {
            self.map.remove(key);
            return Err(());
        }
        Ok(self.map.get_mut(key).map(|(e, v)| (v, *e)))
    }

    /// Drops `key` before its expiry (its queue slot goes at that expiry).
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_entries_go_on_the_next_insert() {
        let mut m = Expiring::new(10);
        for k in 0..5u32 {
            m.insert(k, (), 100 + u64::from(k), 0).unwrap();
        }
        m.insert(9, (), 300, 102).unwrap();
        // 100, 101 and 102 expired at 102; 103, 104 and the new one stay.
        assert_eq!(m.len(), 3);
        assert_eq!(m.order.len(), 3);
    }

    #[test]
    fn a_full_map_of_live_entries_refuses_without_dropping_any() {
        let mut m = Expiring::new(3);
        for k in 0..3u32 {
            m.insert(k, k, 1_000, 0).unwrap();
        }
        assert_eq!(m.insert(7, 7, 1_000, 10), Err(Full));
        assert_eq!(m.len(), 3);
        // Once the first ones expire there is room again.
        assert_eq!(m.insert(7, 7, 2_000, 1_000), Ok(None));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn a_live_key_reports_what_it_replaced() {
        let mut m = Expiring::new(3);
        assert_eq!(m.insert(1u32, "a", 100, 0), Ok(None));
        assert_eq!(m.insert(1, "b", 150, 50), Ok(Some("a")));
        // Even when full, a live key may be renewed (it adds no entry).
        m.insert(2, "c", 150, 50).unwrap();
        m.insert(3, "d", 150, 50).unwrap();
        assert_eq!(m.insert(1, "e", 160, 60), Ok(Some("b")));
    }

    #[test]
    fn an_early_removal_does_not_let_the_old_expiry_drop_a_new_entry() {
        let mut m = Expiring::new(4);
        m.insert(1u32, "old", 100, 0).unwrap();
        assert_eq!(m.get(&1, 100), Err(()), "expired at 100: dropped on lookup");
        m.insert(1, "new", 300, 100).unwrap();
        // The queue still holds (100, 1); sweeping it must keep "new".
        m.insert(2, "x", 300, 200).unwrap();
        assert_eq!(m.get(&1, 200), Ok(Some((&"new", 300))));
    }

    #[test]
    fn lookups_never_serve_an_expired_entry() {
        let mut m = Expiring::new(4);
        m.insert(1u32, (), 100, 0).unwrap();
        assert_eq!(m.get(&1, 99), Ok(Some((&(), 100))));
        assert_eq!(m.get(&1, 100), Err(()));
        assert_eq!(m.get(&1, 100), Ok(None));
    }
}
