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

use crate::config::Config;
use crate::limits::{Buckets, Rate};
use crate::passwords;
use crate::pool::{FairPool, PoolError};
use crate::proto::ErrorCode;
use crate::proto::access::Password;
use crate::store::{Store, UserRecord};
use std::sync::{Arc, Mutex};

pub struct AuthWorker {
    pub store: Store,
    pub max_failures: u32,
    /// What an unknown user's password is checked against.
    pub dummy: Arc<str>,
}

/// Terminals whose check rate is followed (`limits::Buckets`).
const MAX_TERMINALS: usize = 100_000;

/// A refusal before or from a check, with the hint a `busy` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    /// When the terminal may try again, ms (over its rate).
    pub retry_ms: Option<u64>,
}

impl From<ErrorCode> for Refused {
    fn from(code: ErrorCode) -> Self {
        Self {
            code,
            retry_ms: None,
        }
    }
}

/// The auth pool and the terminals' check rates.
pub struct Checks {
    pool: FairPool<[u8; 32], AuthWorker>,
    rate: Mutex<Buckets<[u8; 32]>>,
}

impl Checks {
    pub fn start(cfg: &Config) -> anyhow::Result<Self> {
        let a = &cfg.auth;
        // A hash of a random password nobody knows, with the parameters new
        // hashes get, so checking it costs what checking a user's does.
        let mut junk = [0u8; 32];
        rand::fill(&mut junk);
        let dummy: Arc<str> = passwords::hash(&junk, a.argon2_m_kib, a.argon2_t)?.into();
        let db = cfg.db_path();
        let max_failures = a.max_failures;
        let pool = FairPool::start(
            "auth",
            a.workers,
            a.queue,
            a.queue_per_terminal,
            move |_| {
                Store::open(&db).map(|store| AuthWorker {
                    store,
                    max_failures,
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
        })
    }

    /// Checks a password of `user` for `terminal`, within the terminal's
    /// rate and its turn on the pool.
    pub async fn check(
        &self,
        which: Which,
        terminal: [u8; 32],
        user: &str,
        password: Password,
    ) -> Result<UserRecord, Refused> {
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
        let u = user.to_owned();
        self.pool
            .run(terminal, move |w| w.check(which, &terminal, &u, &password))
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
        let Some(u) = self.store.user_get(user).map_err(internal)? else {
            // As long as a wrong password takes (§1.5).
            passwords::verify(password.expose(), &self.dummy);
            return Err(ErrorCode::UnknownUser);
        };
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
