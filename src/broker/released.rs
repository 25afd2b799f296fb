//! Released home-card keys: one HSM session object per user, shared by
//! that user's released sessions.
//!
//! Unwrapping a home-card key costs about 0.5 ms of SoftHSM CPU, twice a
//! full TLS handshake (the bench's floor). A user on several terminals, or
//! one who reconnects, would pay it on every session. Instead the first
//! release unwraps; a later release of the same user, after its own
//! second-password check, takes the same session object; the last of those
//! sessions to end destroys it. Nothing changes in what a session may do:
//! the key is the user's own, and each session still proves the second
//! password before it gets it.

use super::Shared;
use crate::hsm::SessionKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// A user's released key; destroyed in the HSM when the last session
/// holding it ends.
pub struct UserKey {
    pub key: SessionKey,
    user: String,
    shared: Arc<Shared>,
}

impl Drop for UserKey {
    fn drop(&mut self) {
        super::exchange::destroy_later(&self.shared, self.key);
        self.shared.released.forget(&self.user);
    }
}

/// The users with a released key, by name. Weak, so an entry never keeps a
/// key alive; bounded by the open sessions.
#[derive(Default)]
pub struct Keys(Mutex<HashMap<String, Weak<UserKey>>>);

impl Keys {
    /// The user's key if one is released and still valid in `epoch`.
    pub fn get(&self, user: &str, epoch: u64) -> Option<Arc<UserKey>> {
        let found = self
            .0
            .lock()
            .expect("released keys")
            .get(user)
            .and_then(Weak::upgrade);
        // Filtered after the lock is released: dropping the last holder of
        // a stale key runs `forget`, which takes the lock.
        found.filter(|k| k.key.epoch == epoch)
    }

    /// Records a freshly unwrapped key for `user`.
    pub fn insert(&self, shared: &Arc<Shared>, user: &str, key: SessionKey) -> Arc<UserKey> {
        let k = Arc::new(UserKey {
            key,
            user: user.to_owned(),
            shared: shared.clone(),
        });
        self.0
            .lock()
            .expect("released keys")
            .insert(user.to_owned(), Arc::downgrade(&k));
        k
    }

    /// Drops the user's entry once no session holds its key.
    fn forget(&self, user: &str) {
        let mut map = self.0.lock().expect("released keys");
        if map.get(user).is_some_and(|w| w.strong_count() == 0) {
            map.remove(user);
        }
    }
}
