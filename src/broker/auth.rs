//! Password checks, run on the auth pool (argon2id is slow by design).
//!
//! The order of checks is part of the protocol: unknown user, then the
//! terminal certificate's binding to that user, then the lock, then the
//! password. A wrong password counts towards the lock; the counter is in
//! the database so it survives restarts.

use crate::passwords;
use crate::proto::ErrorCode;
use crate::proto::access::Password;
use crate::store::{Store, UserRecord};

pub struct AuthWorker {
    pub store: Store,
    pub max_failures: u32,
}

/// Which of the two passwords is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Access,
    Release,
}

fn internal(e: anyhow::Error) -> ErrorCode {
    tracing::error!(error = %e, "registry read failed");
    ErrorCode::Internal
}

impl AuthWorker {
    /// Checks `password` for `user` arriving on the terminal `fingerprint`.
    /// Returns the user's record (wrapped home-card key, certificate).
    pub fn check(
        &mut self,
        which: Which,
        fingerprint: &[u8; 32],
        user: &str,
        password: &Password,
    ) -> Result<UserRecord, ErrorCode> {
        let u = self
            .store
            .user_get(user)
            .map_err(internal)?
            .ok_or(ErrorCode::UnknownUser)?;
        let t = self
            .store
            .terminal_get(fingerprint)
            .map_err(internal)?
            .ok_or(ErrorCode::TerminalRevoked)?;
        if t.revoked {
            return Err(ErrorCode::TerminalRevoked);
        }
        if t.user_id != u.id {
            return Err(ErrorCode::WrongTerminal);
        }
        if u.locked {
            return Err(ErrorCode::Locked);
        }
        let phc = match which {
            Which::Access => &u.pw_access,
            Which::Release => &u.pw_release,
        };
        if passwords::verify(password.expose(), phc) {
            // Most logins find no failures to clear: no write then. A failure
            // recorded meanwhile by another attempt stays counted.
            if u.failures != 0 {
                self.store.reset_failures(user).map_err(internal)?;
            }
            return Ok(u);
        }
        let (failures, locked) = self
            .store
            .record_failure(user, self.max_failures)
            .map_err(internal)?;
        tracing::warn!(user, failures, locked, ?which, "wrong password");
        if locked {
            crate::metrics::lockout();
            tracing::warn!(target: "audit", user, "card locked");
        }
        Err(if locked {
            ErrorCode::Locked
        } else {
            ErrorCode::WrongPassword
        })
    }
}
