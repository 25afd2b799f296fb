//! [`PgLedger`]: the ledger on a PostgreSQL server, shared by several
//! broker nodes. Same writer, checks, chain and audit as SQLite (they are
//! one piece of code, `apply.rs`); only the SQL differs.
//!
//! ```text
//! node A writer ─┐  BEGIN; LOCK TABLE entries IN SHARE ROW EXCLUSIVE MODE
//! node B writer ─┴─►  (one group at a time, ledger-wide) re-read head ─► append ─► COMMIT
//! readers ─────────► plain SELECTs (never wait for the lock)
//! audit ───────────► REPEATABLE READ READ ONLY snapshot
//! mailers ─────────► claim due outbox rows with FOR UPDATE SKIP LOCKED + a lease
//! ```
//!
//! Why a table lock rather than `SERIALIZABLE`: every group appends to the
//! one chain head, so concurrent groups would always conflict and retry.
//! The lock makes writers take turns with no retry loop, and
//! `READ COMMITTED` statements after it see everything committed before.
//! `LOCK TABLE` conflicts with itself and with plain `INSERT`s but not with
//! reads. The sync `postgres` client runs its own small runtime inside;
//! callers see none of it.

use super::ledger::{GroupLedger, LedgerConfig, MacFactory};
use super::mailer::{Outbox, OutboxUpdate, Outgoing};
use super::store::{DecisionRow, ENTRY_COLUMNS, EntryRow, KeyedDecision, NewMail, Scanned, Store};
use super::{Decision, Entry, WalletError, WalletResult};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, IsolationLevel, NoTls, Row, Statement};
use std::path::PathBuf;

/// The shared ledger: one PostgreSQL database.
pub type PgLedger = GroupLedger<PgStore>;

/// Where the ledger's database is. The connection string is libpq's
/// `key=value` form (`host=127.0.0.1 port=5432 user=keybroker
/// dbname=keybroker`, or `host=/run/postgresql` for a Unix socket) and must
/// not carry a password: that comes from `password_file` (first line), or
/// the server trusts the local peer.
#[derive(Clone, Debug)]
pub struct PgConnect {
    pub url: String,
    pub password_file: Option<PathBuf>,
}

impl PgConnect {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            password_file: None,
        }
    }

    fn config(&self) -> WalletResult<postgres::Config> {
        let mut c: postgres::Config = self
            .url
            .parse()
            .map_err(|e| WalletError::storage(format!("postgres_url: {e}")))?;
        if c.get_password().is_some() {
            return Err(WalletError::storage(
                "postgres_url must not contain a password: use wallet.password_file",
            ));
        }
        if let Some(p) = &self.password_file {
            let text = std::fs::read_to_string(p).map_err(|e| {
                WalletError::storage(format!("reading {}: {}", p.display(), e.kind()))
            })?;
            let pw = text.lines().next().unwrap_or("");
            if !pw.is_empty() {
                c.password(pw);
            }
        }
        if c.get_application_name().is_none() {
            c.application_name("keybroker");
        }
        Ok(c)
    }

    /// A new connection (no TLS: loopback, a Unix socket or a trusted
    /// network).
    pub fn connect(&self) -> WalletResult<Client> {
        Ok(self.config()?.connect(NoTls)?)
    }
}

impl PgLedger {
    /// Connects, creates the tables if needed and starts the writer.
    /// Several nodes may do this on one database at the same time.
    pub fn connect(db: &PgConnect, cfg: LedgerConfig, mac: MacFactory) -> WalletResult<Self> {
        let db = db.clone();
        Self::start(cfg, mac, move || PgStore::open(&db))
    }
}

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS accounts (
    "user"   TEXT NOT NULL,
    currency TEXT NOT NULL,
    balance  BIGINT NOT NULL CHECK (balance >= 0),
    PRIMARY KEY ("user", currency)
);
CREATE TABLE IF NOT EXISTS entries (
    seq             BIGINT PRIMARY KEY,
    "user"          TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('purchase', 'cancel', 'topup')),
    decision_id     TEXT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount > 0),
    currency        TEXT NOT NULL,
    balance_after   BIGINT NOT NULL CHECK (balance_after >= 0),
    market          TEXT NOT NULL,
    order_ref       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    voucher_id      TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    prev_mac        BYTEA NOT NULL,
    mac             BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_user ON entries ("user", seq);
CREATE OR REPLACE FUNCTION keybroker_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'ledger entries are append-only'; END $$;
CREATE OR REPLACE TRIGGER entries_no_update BEFORE UPDATE ON entries
    FOR EACH ROW EXECUTE FUNCTION keybroker_append_only();
CREATE OR REPLACE TRIGGER entries_no_delete BEFORE DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION keybroker_append_only();
CREATE OR REPLACE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION keybroker_append_only();
CREATE TABLE IF NOT EXISTS decisions (
    id              TEXT PRIMARY KEY,
    "user"          TEXT NOT NULL,
    market          TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    order_ref       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('active', 'cancelled')),
    seq             BIGINT NOT NULL,
    balance_after   BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL,
    UNIQUE ("user", idempotency_key)
);
CREATE TABLE IF NOT EXISTS vouchers_used (
    voucher_id TEXT PRIMARY KEY,
    seq        BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id              BIGSERIAL PRIMARY KEY,
    message_id      TEXT NOT NULL UNIQUE,
    "user"          TEXT NOT NULL,
    mail_to         TEXT NOT NULL,
    subject         TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_ms, id) WHERE state = 'pending';
-- outbox_due serves every query the older index did; keeping both cost
-- every purchase an insert into each.
DROP INDEX IF EXISTS outbox_pending;
"#;

/// Serialises schema creation between nodes starting together (`CREATE …
/// IF NOT EXISTS` is not safe against a concurrent twin). Any constant
/// unlikely to collide with the database's other users.
const SCHEMA_LOCK: i64 = 0x6b62_6c65_6467_6572; // "kbledger"

/// Statements prepared once per connection.
struct Stmts {
    head: Statement,
    balance_of: Statement,
    set_balance: Statement,
    insert_entry: Statement,
    queue_mail: Statement,
    decision_by_key: Statement,
    decision_by_id: Statement,
    insert_decision: Statement,
    mark_cancelled: Statement,
    voucher_used: Statement,
    insert_voucher: Statement,
    scan_entries: Statement,
    scan_accounts: Statement,
    balances: Statement,
    history: Statement,
}

/// One connection to the ledger's database.
pub struct PgStore {
    c: Client,
    st: Stmts,
}

fn entry_row(r: &Row) -> Result<EntryRow, postgres::Error> {
    Ok(EntryRow {
        seq: r.try_get(0)?,
        user: r.try_get(1)?,
        kind: r.try_get(2)?,
        decision_id: r.try_get(3)?,
        amount: r.try_get(4)?,
        currency: r.try_get(5)?,
        balance_after: r.try_get(6)?,
        market: r.try_get(7)?,
        order_ref: r.try_get(8)?,
        idempotency_key: r.try_get(9)?,
        voucher_id: r.try_get(10)?,
        created_ms: r.try_get(11)?,
        prev_mac: r.try_get(12)?,
        mac: r.try_get(13)?,
    })
}

const NO_PARAMS: [&(dyn ToSql + Sync); 0] = [];

impl PgStore {
    /// Connects, creates the tables if missing, prepares the statements.
    pub fn open(db: &PgConnect) -> WalletResult<Self> {
        let mut c = db.connect()?;
        let mut t = c.transaction()?;
        t.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        t.batch_execute(SCHEMA)?;
        t.commit()?;
        let st = Stmts {
            head: c.prepare("SELECT seq, mac FROM entries ORDER BY seq DESC LIMIT 1")?,
            balance_of: c
                .prepare(r#"SELECT balance FROM accounts WHERE "user" = $1 AND currency = $2"#)?,
            set_balance: c.prepare(
                r#"INSERT INTO accounts ("user", currency, balance) VALUES ($1, $2, $3)
                   ON CONFLICT ("user", currency) DO UPDATE SET balance = excluded.balance"#,
            )?,
            insert_entry: c.prepare(&format!(
                "INSERT INTO entries ({ENTRY_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
            ))?,
            queue_mail: c.prepare(
                r#"INSERT INTO outbox (message_id, "user", mail_to, subject, body, state, attempts, next_attempt_ms, created_ms)
                   VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)"#,
            )?,
            decision_by_key: c.prepare(
                r#"SELECT id, seq, market, amount, currency, order_ref, balance_after, created_ms, state
                   FROM decisions WHERE "user" = $1 AND idempotency_key = $2"#,
            )?,
            decision_by_id: c.prepare(
                r#"SELECT "user", market, amount, currency, order_ref, state FROM decisions WHERE id = $1"#,
            )?,
            insert_decision: c.prepare(
                r#"INSERT INTO decisions (id, "user", market, amount, currency, order_ref, idempotency_key, state, seq, balance_after, created_ms)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10)"#,
            )?,
            mark_cancelled: c.prepare("UPDATE decisions SET state = 'cancelled' WHERE id = $1")?,
            voucher_used: c.prepare("SELECT 1 FROM vouchers_used WHERE voucher_id = $1")?,
            insert_voucher: c
                .prepare("INSERT INTO vouchers_used (voucher_id, seq) VALUES ($1, $2)")?,
            scan_entries: c.prepare(&format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq"))?,
            scan_accounts: c.prepare(r#"SELECT "user", currency, balance FROM accounts"#)?,
            balances: c.prepare(
                r#"SELECT currency, balance FROM accounts WHERE "user" = $1 AND balance != 0 ORDER BY currency"#,
            )?,
            history: c.prepare(&format!(
                r#"SELECT {ENTRY_COLUMNS} FROM entries WHERE "user" = $1 ORDER BY seq"#
            ))?,
        };
        Ok(Self { c, st })
    }
}

impl Store for PgStore {
    fn begin_write(&mut self) -> WalletResult<()> {
        Ok(self.c.batch_execute(
            "BEGIN ISOLATION LEVEL READ COMMITTED; LOCK TABLE entries IN SHARE ROW EXCLUSIVE MODE",
        )?)
    }
    fn commit(&mut self) -> WalletResult<()> {
        Ok(self.c.batch_execute("COMMIT")?)
    }
    fn rollback(&mut self) -> WalletResult<()> {
        Ok(self.c.batch_execute("ROLLBACK")?)
    }

    fn head(&mut self) -> WalletResult<Option<(i64, Vec<u8>)>> {
        let row = self.c.query_opt(&self.st.head, &[])?;
        Ok(row
            .map(|r| r.try_get(0).and_then(|s| Ok((s, r.try_get(1)?))))
            .transpose()?)
    }

    fn mac_at(&mut self, seq: i64) -> WalletResult<Option<Vec<u8>>> {
        // Once per writer start: not worth a prepared statement.
        let row = self
            .c
            .query_opt("SELECT mac FROM entries WHERE seq = $1", &[&seq])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn balance_of(&mut self, user: &str, currency: &str) -> WalletResult<i64> {
        let row = self.c.query_opt(&self.st.balance_of, &[&user, &currency])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0))
    }

    fn set_balance(&mut self, user: &str, currency: &str, balance: i64) -> WalletResult<()> {
        self.c
            .execute(&self.st.set_balance, &[&user, &currency, &balance])?;
        Ok(())
    }

    fn insert_entry(&mut self, e: &Entry) -> WalletResult<()> {
        self.c.execute(
            &self.st.insert_entry,
            &[
                &e.seq,
                &e.user,
                &e.kind.as_str(),
                &e.decision_id,
                &e.amount.minor,
                &e.amount.currency.as_str(),
                &e.balance_after,
                &e.market,
                &e.order_ref,
                &e.idempotency_key,
                &e.voucher_id,
                &e.created_ms,
                &&e.prev_mac[..],
                &&e.mac[..],
            ],
        )?;
        Ok(())
    }

    fn queue_mail(&mut self, m: &NewMail<'_>) -> WalletResult<()> {
        self.c.execute(
            &self.st.queue_mail,
            &[&m.message_id, &m.user, &m.to, &m.subject, &m.body, &m.now],
        )?;
        Ok(())
    }

    fn outbox_update(&mut self, u: &OutboxUpdate) -> WalletResult<()> {
        update_outbox(&mut self.c, u)
    }

    fn decision_by_key(&mut self, user: &str, key: &str) -> WalletResult<Option<KeyedDecision>> {
        let Some(r) = self.c.query_opt(&self.st.decision_by_key, &[&user, &key])? else {
            return Ok(None);
        };
        Ok(Some(KeyedDecision {
            id: r.try_get(0)?,
            seq: r.try_get(1)?,
            market: r.try_get(2)?,
            amount: r.try_get(3)?,
            currency: r.try_get(4)?,
            order_ref: r.try_get(5)?,
            balance_after: r.try_get(6)?,
            created_ms: r.try_get(7)?,
            cancelled: r.try_get::<_, String>(8)? == "cancelled",
        }))
    }

    fn decision_by_id(&mut self, id: &str) -> WalletResult<Option<DecisionRow>> {
        let Some(r) = self.c.query_opt(&self.st.decision_by_id, &[&id])? else {
            return Ok(None);
        };
        Ok(Some(DecisionRow {
            user: r.try_get(0)?,
            market: r.try_get(1)?,
            amount: r.try_get(2)?,
            currency: r.try_get(3)?,
            order_ref: r.try_get(4)?,
            state: r.try_get(5)?,
        }))
    }

    fn insert_decision(&mut self, d: &Decision, idempotency_key: &str) -> WalletResult<()> {
        self.c.execute(
            &self.st.insert_decision,
            &[
                &d.id,
                &d.user,
                &d.market,
                &d.amount.minor,
                &d.amount.currency.as_str(),
                &d.order_ref,
                &idempotency_key,
                &d.seq,
                &d.balance_after,
                &d.created_ms,
            ],
        )?;
        Ok(())
    }

    fn mark_cancelled(&mut self, id: &str) -> WalletResult<()> {
        self.c.execute(&self.st.mark_cancelled, &[&id])?;
        Ok(())
    }

    fn voucher_used(&mut self, voucher_id: &str) -> WalletResult<bool> {
        Ok(self
            .c
            .query_opt(&self.st.voucher_used, &[&voucher_id])?
            .is_some())
    }

    fn insert_voucher(&mut self, voucher_id: &str, seq: i64) -> WalletResult<()> {
        self.c
            .execute(&self.st.insert_voucher, &[&voucher_id, &seq])?;
        Ok(())
    }

    fn scan(&mut self, sink: &mut dyn FnMut(Scanned) -> WalletResult<()>) -> WalletResult<()> {
        let mut t = self
            .c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        {
            let mut rows = t.query_raw(&self.st.scan_entries, NO_PARAMS)?;
            while let Some(row) = rows.next()? {
                sink(Scanned::Entry(entry_row(&row)?.into_entry()))?;
            }
        }
        {
            let mut rows = t.query_raw(&self.st.scan_accounts, NO_PARAMS)?;
            while let Some(row) = rows.next()? {
                sink(Scanned::Account(
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                ))?;
            }
        }
        t.rollback()?;
        Ok(())
    }

    fn balances(&mut self, user: &str) -> WalletResult<Vec<(String, i64)>> {
        let rows = self.c.query(&self.st.balances, &[&user])?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((r.try_get(0)?, r.try_get(1)?));
        }
        Ok(out)
    }

    fn history(&mut self, user: &str) -> WalletResult<Vec<Result<Entry, String>>> {
        let rows = self.c.query(&self.st.history, &[&user])?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(entry_row(&r)?.into_entry());
        }
        Ok(out)
    }
}

/// How long a mailer's claim on a due row lasts: another node's mailer
/// takes the row over only after this, so a node that died mid-send delays
/// its mail by at most this much.
const CLAIM_MS: i64 = 120_000;

/// The outbox of a PostgreSQL ledger, for [`super::mailer::Mailer`]. Mailers
/// on several nodes share it: each round claims its rows (`FOR UPDATE SKIP
/// LOCKED`, then a lease in `next_attempt_ms`), so a row goes to one node.
pub struct PgOutbox(Client);

/// Applies `u` on `c` (a transaction, or a client for one statement).
fn update_outbox(c: &mut impl GenericClient, u: &OutboxUpdate) -> WalletResult<()> {
    match u {
        OutboxUpdate::Sent(ids) => {
            c.execute(
                "UPDATE outbox SET state = 'sent' WHERE id = ANY($1)",
                &[ids],
            )?;
        }
        OutboxUpdate::Defer { failed, rest, next } => {
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = $2 WHERE id = $1",
                &[failed, next],
            )?;
            c.execute(
                "UPDATE outbox SET next_attempt_ms = $2 WHERE id = ANY($1)",
                &[rest, next],
            )?;
        }
    }
    Ok(())
}

impl PgOutbox {
    pub fn connect(db: &PgConnect) -> WalletResult<Self> {
        // The writer creates the tables; a mailer may start first.
        drop(PgStore::open(db)?);
        let c = db.connect()?;
        // A lost "sent" mark only re-sends under the same Message-ID.
        let mut o = Self(c);
        o.0.batch_execute("SET synchronous_commit = off")?;
        Ok(o)
    }
}

impl Outbox for PgOutbox {
    fn due(&mut self, now: i64, limit: usize) -> WalletResult<Vec<Outgoing>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let claim = now.saturating_add(CLAIM_MS);
        let rows = self.0.query(
            "UPDATE outbox SET next_attempt_ms = $3 WHERE id IN (
                 SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_ms <= $1
                 ORDER BY next_attempt_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id, message_id, mail_to, subject, body, attempts",
            &[&now, &limit, &claim],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(Outgoing {
                id: r.try_get(0)?,
                message_id: r.try_get(1)?,
                to: r.try_get(2)?,
                subject: r.try_get(3)?,
                body: r.try_get(4)?,
                attempts: u32::try_from(r.try_get::<_, i64>(5)?).unwrap_or(u32::MAX),
            });
        }
        out.sort_by_key(|m| m.id);
        Ok(out)
    }

    fn mark_sent(&mut self, ids: &[i64]) -> WalletResult<()> {
        update_outbox(&mut self.0, &OutboxUpdate::Sent(ids.to_vec()))
    }

    fn defer(&mut self, failed: i64, rest: &[i64], next: i64) -> WalletResult<()> {
        let mut t = self.0.transaction()?;
        update_outbox(
            &mut t,
            &OutboxUpdate::Defer {
                failed,
                rest: rest.to_vec(),
                next,
            },
        )?;
        t.commit()?;
        Ok(())
    }

    fn pending(&mut self) -> WalletResult<usize> {
        let n: i64 = self
            .0
            .query_one("SELECT count(*) FROM outbox WHERE state = 'pending'", &[])?
            .try_get(0)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}
