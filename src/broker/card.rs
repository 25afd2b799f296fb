//! Opening the home card with the second password (Release, and TopUp's
//! password). The password is checked by the HSM: it yields the data the
//! user's key-encryption key is derived from, and only the right one
//! unwraps the user's key (docs/SECURITY.md). Nothing in the registry can
//! stand in for it.
//!
//! ```text
//! auth pool: §1.5 steps 1–3, argon2id (one run) ─► CardSecret (KEK data, proof key)
//! core:      the user's released key, from this row: this password's proof? ─► take it (else wrong)
//! HSM pool:  verifier of the KEK data == the stored one? KEK = AES_CBC_ENCRYPT_DATA(kb-kek-base,
//!            KEK data); unwrap ─► key, or refused
//! auth pool: refused ─► counted as a wrong password; opened ─► failures cleared
//! ```
//!
//! A row from before the binding (the second password stored as a PHC
//! hash, the key wrapped under the plain master key) is checked the old
//! way once, then bound: a fresh salt, the key wrapped again under its KEK
//! inside the HSM, and the row rewritten (`Store::rebind`).

use super::auth::{AuthWorker, Refused, Which, internal};
use super::conn::Core;
use super::exchange::{self, pool_code};
use super::released::{Opened, UserKey};
use crate::hsm::ops::{self, Refusal, refused_blob};
use crate::passwords::{self, Binding, CardSecret, Stored};
use crate::proto::ErrorCode;
use crate::proto::access::Password;
use crate::store::UserRecord;
use std::sync::Arc;

/// What the auth pool found: the user, the secret the password gave, and
/// the stored verifier, or for a row from before the binding, the
/// binding it gets.
struct Plan {
    record: UserRecord,
    secret: CardSecret,
    check: Check,
}

enum Check {
    Verifier([u8; 32]),
    Rebind(Binding),
}

impl AuthWorker {
    fn plan(
        &mut self,
        fingerprint: &[u8; 32],
        user: &str,
        password: &Password,
    ) -> Result<Plan, ErrorCode> {
        let record = self.gate(fingerprint, user, password)?;
        let (bound, verifier) = match passwords::stored(&record.pw_release) {
            Some(Stored::Bound(b, v)) => (b, v),
            Some(Stored::Hash(_)) => {
                let record = self.verify_hash(record, Which::Release, password)?;
                let b = Binding::like(&record.pw_release).map_err(internal)?;
                let secret = b.card_secret(password.expose(), user).map_err(internal)?;
                return Ok(Plan {
                    record,
                    secret,
                    check: Check::Rebind(b),
                });
            }
            None => return Err(internal(anyhow::anyhow!("{user}: pw_release unreadable"))),
        };
        let secret = bound
            .card_secret(password.expose(), user)
            .map_err(internal)?;
        Ok(Plan {
            record,
            secret,
            check: Check::Verifier(verifier),
        })
    }
}

/// Opens `user`'s home card with the second `password`, on the terminal
/// `fingerprint`: the released key (the one already released if this
/// password released it) and the user's record.
pub(super) async fn open(
    core: &Core,
    fingerprint: [u8; 32],
    user: &str,
    password: Password,
) -> Result<(Arc<UserKey>, UserRecord), Refused> {
    let shared = &core.shared;
    let u = user.to_owned();
    let plan = shared
        .auth
        .checked(fingerprint, move |w| w.plan(&fingerprint, &u, &password))
        .await?;
    let Plan {
        record,
        secret,
        check,
    } = plan;
    if let Check::Verifier(_) = check
        && let Some(k) = shared.released.get(user, shared.hsm.epoch())
        && k.opened.row == row_digest(&record.wrapped_key, &record.pw_release)
    {
        // The row the key came from: this password's proof is the one
        // that opened it, or the password is wrong.
        if crate::crypto::ct_eq(&k.opened.proof, &secret.proof(&record.wrapped_key)) {
            settle(core, fingerprint, &record, None).await?;
            return Ok((k, record));
        }
        return Err(wrong(core, fingerprint, user).await.into());
    }
    let data = secret.kek_data.clone();
    let stored = record.wrapped_key.clone();
    let stored_verifier = match &check {
        Check::Verifier(v) => Some(*v),
        Check::Rebind(_) => None,
    };
    let opened = exchange::hsm(core, "unwrap", move |w| {
        let (s, keys) = (&w.session, &w.keys);
        let (blob, verifier) = match stored_verifier {
            Some(v) => (stored.clone(), v),
            None => match refused_blob(ops::rewrap_legacy_user_key(s, keys, &data, &stored))? {
                Ok(rebound) => rebound,
                Err(refusal) => return Ok(Err(refusal)),
            },
        };
        let key = ops::open_bound_user_key(s, keys, &data, &verifier, &blob)?;
        Ok(key.map(|h| (w.session_key(h), blob, verifier)))
    })
    .await?;
    let (key, blob, verifier) = match opened {
        Ok(opened) => opened,
        Err(refusal) => {
            if let Refusal::Blob(e) = refusal {
                tracing::error!(target: "audit", user, error = %e,
                    "the second password was accepted but the key did not unwrap: \
                     the row was rewritten by someone with the HSM, or the HSM failed");
            }
            return Err(wrong(core, fingerprint, user).await.into());
        }
    };
    let (binding, rebind) = match check {
        Check::Rebind(b) => {
            let binding = b.encode(&verifier);
            (binding.clone(), Some((blob.clone(), binding)))
        }
        Check::Verifier(_) => (record.pw_release.clone(), None),
    };
    let opened = Opened {
        proof: secret.proof(&blob),
        row: row_digest(&blob, &binding),
    };
    let k = shared.released.insert(shared, user, key, opened);
    settle(core, fingerprint, &record, rebind).await?;
    Ok((k, record))
}

/// Which blob and binding a key was opened from.
fn row_digest(wrapped: &[u8], binding: &str) -> [u8; 32] {
    let len = (wrapped.len() as u32).to_be_bytes();
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &[&len[..], wrapped, binding.as_bytes()].concat(),
    );
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Counts a wrong second password, in the terminal's turn; the refusal
/// to answer with.
async fn wrong(core: &Core, terminal: [u8; 32], user: &str) -> ErrorCode {
    let u = user.to_owned();
    core.shared
        .auth
        .run(terminal, move |w| w.count_failure(&u, Which::Release))
        .await
        .unwrap_or_else(pool_code)
}

/// After the card opened: clears the user's failures, and writes a
/// migrated row's new blob and binding. A failed migration write only
/// delays it to the next release.
async fn settle(
    core: &Core,
    terminal: [u8; 32],
    record: &UserRecord,
    rebind: Option<(Vec<u8>, String)>,
) -> Result<(), ErrorCode> {
    if record.failures == 0 && rebind.is_none() {
        return Ok(());
    }
    let u = record.clone();
    core.shared
        .auth
        .run(terminal, move |w| {
            if let Some((blob, binding)) = &rebind {
                match w.store.rebind(&u.id, &u.wrapped_key, blob, binding) {
                    Ok(true) => {
                        tracing::info!(target: "audit", user = u.id, "home-card key bound to the second password")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(user = u.id, error = %e, "binding the home-card key failed; again at the next release")
                    }
                }
            }
            w.clear_failures(&u)
        })
        .await
        .map_err(pool_code)?
}
