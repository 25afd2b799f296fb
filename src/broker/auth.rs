//! Password checks, run on the auth pool (argon2id is slow by design).
//!
//! ```text
//! core ─► Checks::check(terminal) ─► terminal's bucket (checks_per_terminal_per_s) ── empty ─► busy, retry hint
//!                                 ─► fair pool: the terminal's queue, workers take terminals in turn
//!                                 ─► AuthWorker::check: user, binding, lock, argon2id
//! ```
//!
//! The order of checks is part of the protocol: unknown user, then the
//! terminal certificate's binding to that user, then the lock, then the
//! password. A wrong password counts towards the lock; the counter is in
//! the database so it survives restarts. An unknown user costs the same
//! argon2id as a wrong password, against a dummy hash made at start with
//! the configured parameters (docs/PROTOCOL.md §1.5).
//!
//! Fairness is per terminal, the certificate TLS verified: the user a
//! Login names is what is being checked, so keying by it would let one
//! terminal spread its load over made-up names.
//!
//! A registry row that fails its MAC check (`rowmac`) refuses at its step:
//! a terminal's as `terminal_revoked`, a user's as `locked`
//! (docs/PROTOCOL.md §1.5); the store has written the audit line.
//! The second password is checked by the HSM, not here (`card`).

use crate::config::Config;
use crate::limits::{Buckets, Rate};
use crate::passwords;
use crate::pool::{FairPool, PoolError};
use crate::proto::ErrorCode;
use crate::proto::access::Password;
use crate::rowmac::BadRow;
use crate::store::{Store, UserRecord};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

pub struct AuthWorker {
    pub store: Store,
    pub max_failures: Arc<AtomicU32>,
    /// What an unknown user's password is checked against.
    pub dummy: Arc<str>,
}

/// Terminals whose check rate is followed (`limits::Buckets`).
const MAX_TERMINALS: usize = 100_000;

pub use crate::proto::conn::Refused;

/// The auth pool and the terminals' check rates.
pub struct Checks {
    pool: FairPool<[u8; 32], AuthWorker>,
    rate: Mutex<Buckets<[u8; 32]>>,
    /// `auth.max_failures`, shared with the workers (live on reload).
    max_failures: Arc<AtomicU32>,
}

impl Checks {
    /// `open` gives each worker its registry (sealed: `rowmac`).
    pub fn start(
        cfg: &Config,
        open: impl Fn() -> anyhow::Result<Store> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let a = &cfg.auth;
        // A hash of a random password nobody knows, with the parameters new
        // hashes get, so checking it costs what checking a user's does.
        let mut junk = [0u8; 32];
        rand::fill(&mut junk);
        let dummy: Arc<str> = passwords::hash(&junk, a.argon2_m_kib, a.argon2_t)?.into();
        let max_failures = Arc::new(AtomicU32::new(a.max_failures));
        let workers_max = max_failures.clone();
        let pool = FairPool::start(
            "auth",
            a.workers,
            a.queue,
            a.queue_per_terminal,
            move |_| {
                open().map(|store| AuthWorker {
                    store,
                    max_failures: workers_max.clone(),
                    dummy: dummy.clone(),
                })
            },
        )?;
        let rate = Rate {
            per_s: a.checks_per_terminal_per_s,
            burst: a.checks_burst_per_terminal,
        };
        Ok(Self {
            pool,
            rate: Mutex::new(Buckets::new(rate, MAX_TERMINALS)),
            max_failures,
        })
    }

    /// The limits of a reloaded config: the terminals' check rate and the
    /// failures that lock a card, from the next check on. (argon2id's cost
    /// is the new hashes' business: `user add` reads it.)
    pub fn set_limits(&self, a: &crate::config::AuthConfig) {
        self.max_failures.store(a.max_failures, Ordering::Relaxed);
        self.rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_rate(Rate {
                per_s: a.checks_per_terminal_per_s,
                burst: a.checks_burst_per_terminal,
            });
    }

    /// Checks a password of `user` for `terminal` against its stored hash,
    /// within the terminal's rate and its turn on the pool.
    pub async fn check(
        &self,
        which: Which,
        terminal: [u8; 32],
        user: &str,
        password: Password,
    ) -> Result<UserRecord, Refused> {
        let u = user.to_owned();
        self.checked(terminal, move |w| w.check(which, &terminal, &u, &password))
            .await
    }

    /// Runs a password check `f` for `terminal`, within the terminal's
    /// rate and its turn on the pool.
    pub async fn checked<R: Send + 'static>(
        &self,
        terminal: [u8; 32],
        f: impl FnOnce(&mut AuthWorker) -> Result<R, ErrorCode> + Send + 'static,
    ) -> Result<R, Refused> {
        let now = crate::limits::mono_ms();
        let taken = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&terminal, 1, now);
        if let Err(ms) = taken {
            return Err(Refused {
                code: ErrorCode::Busy,
                retry_ms: Some(ms),
            });
        }
        self.pool
            .run(terminal, f)
            .await
            .map_err(|e| Refused::from(super::exchange::pool_code(e)))?
            .map_err(Refused::from)
    }

    /// Runs other blocking registry or ledger work in `key`'s turn.
    pub async fn run<R: Send + 'static>(
        &self,
        key: [u8; 32],
        f: impl FnOnce(&mut AuthWorker) -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        self.pool.run(key, f).await
    }
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
    /// terminal `fingerprint`: returns the user's record. An unknown user
    /// costs `password` checked against the dummy hash, as long as a wrong
    /// password takes (§1.5).
    pub(super) fn gate(
        &mut self,
        fingerprint: &[u8; 32],
        user: &str,
        password: &Password,
    ) -> Result<UserRecord, ErrorCode> {
        let u = match self.store.user_get(user) {
            Ok(Some(u)) => Ok(u),
            Ok(None) => {
                passwords::verify(password.expose(), &self.dummy);
                return Err(ErrorCode::UnknownUser);
            }
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
        let u = self.gate(fingerprint, user, password)?;
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
        let (failures, locked) = match self
            .store
            .record_failure(user, self.max_failures.load(Ordering::Relaxed))
        {
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
