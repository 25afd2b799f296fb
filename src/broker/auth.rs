//! Password checks, run on the auth pool (argon2id is slow by design).
//!
//! The order of checks is part of the protocol: unknown user, then the
//! terminal certificate's binding to that user, then the lock, then the
//! password. A wrong password counts towards the lock; the counter is in
//! the database so it survives restarts.
//!
//! A registry row that fails its MAC check (`rowmac`) refuses at its step:
//! a terminal's as `terminal_revoked`, a user's as `locked`
//! (docs/PROTOCOL.md §1.5); the store has written the audit line.
//! The second password is checked by the HSM, not here (`card`).

use crate::passwords;
use crate::proto::ErrorCode;
use crate::proto::access::Password;
use crate::rowmac::BadRow;
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

pub(super) fn internal(e: anyhow::Error) -> ErrorCode {
    tracing::error!(error = %e, "registry read failed");
    ErrorCode::Internal
}

/// A registry failure as the terminal sees it: a row that fails its check
/// refuses with `bad`; anything else is the broker's fault.
fn refusal(e: anyhow::Error, bad: ErrorCode) -> ErrorCode {
    if e.is::<BadRow>() { bad } else { internal(e) }
}

impl AuthWorker {
    /// Steps 1–3 of docs/PROTOCOL.md §1.5 for `user` arriving on the
    /// terminal `fingerprint`: returns the user's record.
    pub(super) fn gate(
        &mut self,
        fingerprint: &[u8; 32],
        user: &str,
    ) -> Result<UserRecord, ErrorCode> {
        let u = match self.store.user_get(user) {
            Ok(Some(u)) => Ok(u),
            Ok(None) => return Err(ErrorCode::UnknownUser),
            Err(e) => Err(refusal(e, ErrorCode::Locked)),
        };
        let t = self
            .store
            .terminal_get(fingerprint)
            .map_err(|e| refusal(e, ErrorCode::TerminalRevoked))?
            .ok_or(ErrorCode::TerminalRevoked)?;
        if t.revoked {
            return Err(ErrorCode::TerminalRevoked);
        }
        if t.user_id != user {
            return Err(ErrorCode::WrongTerminal);
        }
        // A user row that fails its check refuses here, after the terminal
        // checks: a foreign terminal learns nothing about the row.
        let u = u?;
        if u.locked {
            return Err(ErrorCode::Locked);
        }
        Ok(u)
    }

    /// Checks `password` for `user` arriving on the terminal `fingerprint`
    /// against the stored hash: the first password, or the second in a
    /// registry row from before the binding.
    pub fn check(
        &mut self,
        which: Which,
        fingerprint: &[u8; 32],
        user: &str,
        password: &Password,
    ) -> Result<UserRecord, ErrorCode> {
        let u = self.gate(fingerprint, user)?;
        let u = self.verify_hash(u, which, password)?;
        self.clear_failures(&u)?;
        Ok(u)
    }

    /// `password` against `u`'s stored hash; a wrong one counted. The
    /// failures are not cleared: the caller does, once all checks pass.
    pub(super) fn verify_hash(
        &mut self,
        u: UserRecord,
        which: Which,
        password: &Password,
    ) -> Result<UserRecord, ErrorCode> {
        let phc = match which {
            Which::Access => &u.pw_access,
            Which::Release => &u.pw_release,
        };
        if passwords::verify(password.expose(), phc) {
            return Ok(u);
        }
        Err(self.count_failure(&u.id, which))
    }

    /// After a right password. Most logins find no failures to clear: no
    /// write then. A failure recorded meanwhile by another attempt stays
    /// counted.
    pub(super) fn clear_failures(&mut self, u: &UserRecord) -> Result<(), ErrorCode> {
        if u.failures != 0 {
            self.store
                .reset_failures(&u.id)
                .map_err(|e| refusal(e, ErrorCode::Locked))?;
        }
        Ok(())
    }

    /// Counts a wrong password; the refusal to answer with.
    pub(super) fn count_failure(&mut self, user: &str, which: Which) -> ErrorCode {
        let (failures, locked) = match self.store.record_failure(user, self.max_failures) {
            Ok(r) => r,
            Err(e) => return refusal(e, ErrorCode::Locked),
        };
        tracing::warn!(user, failures, locked, ?which, "wrong password");
        if locked {
            crate::metrics::lockout();
            tracing::warn!(target: "audit", user, "card locked");
            ErrorCode::Locked
        } else {
            ErrorCode::WrongPassword
        }
    }
}
