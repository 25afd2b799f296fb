//! Released home-card keys: one HSM session object per user, shared by
//! that user's released sessions, and kept a short while after the last.
//!
//! Unwrapping a home-card key costs about 0.5 ms of SoftHSM CPU, twice a
//! full TLS handshake (the bench's floor). A user on several terminals, or
//! one who reconnects, would pay it on every session. Instead the first
//! release unwraps; a later release of the same user, after its own
//! second-password check, takes the same session object. After the last of
//! those sessions ends the object lingers for `hsm.key_linger_s` (default
//! 60 s) from the user's last release, so a terminal that reconnects does
//! not unwrap again; then it is destroyed.
//!
//! Nothing changes in what a session may do: the key is the user's own,
//! and each session still proves the second password before it gets the
//! handle: the key remembers the proof the password that unwrapped it
//! gave (`passwords::CardSecret::proof`) and the registry row it came
//! from ([`Opened`]), and a later release must give the same proof, or
//! unwrap for itself. A different proof from the same row is a wrong
//! password, told without the HSM. The linger does widen, a little,
//! what a compromise of the process reaches: a released key is usable
//! without the password until it goes, where the process could unwrap
//! no key whose password it has not seen (docs/SECURITY.md).

use super::Shared;
use crate::hsm::SessionKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A user's released key; destroyed in the HSM when the last holder drops.
pub struct UserKey {
    pub key: SessionKey,
    pub opened: Opened,
    user: String,
    /// Weak: the lingering entries in [`Keys`] must not keep the broker's
    /// shared state alive through this key.
    shared: Weak<Shared>,
}

impl Drop for UserKey {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            super::exchange::destroy_later(&shared, self.key);
            shared.released.forget(&self.user);
        }
    }
}

/// What a released key was opened with: the proof of the second password
/// (one-way), and a digest of the registry row's blob and binding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub proof: [u8; 32],
    pub row: [u8; 32],
}

/// The users with a released key, by name, bounded by the open sessions
/// plus the users released in the last `linger`.
pub struct Keys {
    linger: Duration,
    map: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    /// What the sessions hold; an entry never keeps a key alive by it.
    key: Weak<UserKey>,
    /// The key held until the instant beside it (the user's last release
    /// plus the linger), so it outlives its sessions.
    kept: Option<(Arc<UserKey>, Instant)>,
}

impl Keys {
    pub fn new(linger: Duration) -> Self {
        Self {
            linger,
            map: Mutex::default(),
        }
    }

    /// The user's key if one is released and still valid in `epoch`; its
    /// linger starts again.
    pub fn get(&self, user: &str, epoch: u64) -> Option<Arc<UserKey>> {
        let mut stale = None;
        let found = {
            let mut map = self.map.lock().expect("released keys");
            let entry = map.get_mut(user)?;
            match entry.key.upgrade() {
                Some(k) if k.key.epoch == epoch => {
                    if !self.linger.is_zero() {
                        entry.kept = Some((k.clone(), Instant::now() + self.linger));
                    }
                    Some(k)
                }
                k => {
                    stale = Some((k, entry.kept.take()));
                    None
                }
            }
        };
        // Dropped after the lock is released: dropping the last holder of a
        // stale key runs `forget`, which takes the lock.
        drop(stale);
        found
    }

    /// Records a freshly unwrapped key for `user`, with what opened it.
    pub fn insert(
        &self,
        shared: &Arc<Shared>,
        user: &str,
        key: SessionKey,
        opened: Opened,
    ) -> Arc<UserKey> {
        let k = Arc::new(UserKey {
            key,
            opened,
            user: user.to_owned(),
            shared: Arc::downgrade(shared),
        });
        let kept = (!self.linger.is_zero()).then(|| (k.clone(), Instant::now() + self.linger));
        let entry = Entry {
            key: Arc::downgrade(&k),
            kept,
        };
        let old = self
            .map
            .lock()
            .expect("released keys")
            .insert(user.to_owned(), entry);
        drop(old); // outside the lock: it may be the last holder of a key
        k
    }

    /// Lets go of the keys whose linger has passed (and of keys from an
    /// HSM epoch before `epoch`); a key still held by a session stays until
    /// that session ends.
    pub fn sweep(&self, epoch: u64) {
        let now = Instant::now();
        let expired: Vec<Arc<UserKey>> = {
            let mut map = self.map.lock().expect("released keys");
            map.values_mut()
                .filter_map(|e| {
                    let due = e
                        .kept
                        .as_ref()
                        .is_some_and(|(k, until)| *until <= now || k.key.epoch != epoch);
                    if due {
                        e.kept.take().map(|(k, _)| k)
                    } else {
                        None
                    }
                })
                .collect()
        };
        drop(expired); // outside the lock, for the same reason
    }

    /// Drops the user's entry once nothing holds its key.
    fn forget(&self, user: &str) {
        let mut map = self.map.lock().expect("released keys");
        if map
            .get(user)
            .is_some_and(|e| e.kept.is_none() && e.key.strong_count() == 0)
        {
            map.remove(user);
        }
    }
}

/// Sweeps the lingering keys every quarter linger (at least every second)
/// until the broker's shared state is gone.
pub fn spawn_sweeper(shared: &Arc<Shared>) -> std::io::Result<()> {
    let linger = shared.released.linger;
    if linger.is_zero() {
        return Ok(());
    }
    let every = (linger / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("key-linger".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(shared) = weak.upgrade() else { return };
                shared.released.sweep(shared.hsm.epoch());
            }
        })
        .map(drop)
}
