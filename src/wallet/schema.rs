//! The ledger's tables, and how every connection to the file is opened.
//!
//! ```text
//! accounts(user, currency) ── balance, CHECK ≥ 0 (the only mutable money)
//! entries(seq) ────────────── append-only (triggers refuse UPDATE/DELETE), HMAC-chained
//! decisions(id) ───────────── purchases; state active → cancelled; (user, key) unique
//! vouchers_used(voucher_id) ─ each voucher credits once
//! outbox(id) ──────────────── mails, pending → sent, written in the same transaction
//! ```

use super::WalletResult;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    user     TEXT NOT NULL,
    currency TEXT NOT NULL,
    balance  INTEGER NOT NULL CHECK (balance >= 0),
    PRIMARY KEY (user, currency)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    seq             INTEGER PRIMARY KEY,
    user            TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('purchase', 'cancel', 'topup')),
    decision_id     TEXT NOT NULL,
    amount          INTEGER NOT NULL CHECK (amount > 0),
    currency        TEXT NOT NULL,
    balance_after   INTEGER NOT NULL CHECK (balance_after >= 0),
    market          TEXT NOT NULL,
    order_ref       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    voucher_id      TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    prev_mac        BLOB NOT NULL,
    mac             BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_user ON entries (user, seq);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TABLE IF NOT EXISTS decisions (
    id              TEXT PRIMARY KEY,
    user            TEXT NOT NULL,
    market          TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    order_ref       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('active', 'cancelled')),
    seq             INTEGER NOT NULL,
    balance_after   INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    UNIQUE (user, idempotency_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vouchers_used (
    voucher_id TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    message_id      TEXT NOT NULL UNIQUE,
    user            TEXT NOT NULL,
    mail_to         TEXT NOT NULL,
    subject         TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (next_attempt_ms) WHERE state = 'pending';
";

/// A connection in WAL mode with `synchronous=FULL`: a commit returns only
/// once it is on disk. Writers from other threads (the mailer) wait up to
/// five seconds for the lock.
pub(crate) fn open(path: &Path) -> WalletResult<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.set_prepared_statement_cache_capacity(32);
    Ok(c)
}
