//! The registry: users, terminals and markets in an embedded SQLite file.
//!
//! ```text
//! enrolment CLI ──► Store (write) ──► keybroker.db (WAL, synchronous=FULL)
//! auth workers ───► Store (read, failure counters)
//! revocations ────► Store (read the revocation log, every 250 ms)
//! ```
//!
//! Each thread opens its own connection; SQLite serialises writers. The
//! failure counter lives here so a lockout survives restarts.
//!
//! Every row of `users`, `terminals`, `markets` and `meta` is sealed: it
//! carries a generation and an HMAC under the HSM's `kb-registry-mac`
//! over the row and its key (`rowmac`). Reads check it and refuse a row
//! that fails with a [`BadRow`] error and an audit line; writes read the
//! row, check it, and replace it only if nobody wrote it meanwhile (its
//! generation and MAC unchanged). A store opened with [`Store::open`] has
//! no HSM and reads only the revocation log.
//!
//! Triggers append to `revocations` whenever a terminal is revoked or
//! deleted, or its user is (removing a user deletes its terminals by
//! cascade), whoever does it: the CLI, another node, or `sqlite3` by hand. Every running broker
//! polls that log and ends the sessions of those terminals
//! (`broker::revoke`), so a revocation needs no message to the brokers.

use crate::rowmac::{BadRow, Canon, ReadRow, Sealer, next_gen};
use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    generation   INTEGER NOT NULL DEFAULT 0,
    mac   BLOB
);
CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY,
    mail        TEXT NOT NULL,
    cert        BLOB NOT NULL,
    public_key  BLOB NOT NULL,
    wrapped_key BLOB NOT NULL,
    pw_access   TEXT NOT NULL,
    -- The second password's binding (argon2id parameters and salt, no
    -- hash: passwords::Binding), or a PHC hash in rows from before it.
    pw_release  TEXT NOT NULL,
    failures    INTEGER NOT NULL DEFAULT 0,
    locked      INTEGER NOT NULL DEFAULT 0,
    created     INTEGER NOT NULL,
    generation         INTEGER NOT NULL DEFAULT 0,
    mac         BLOB
);
CREATE TABLE IF NOT EXISTS terminals (
    fingerprint BLOB PRIMARY KEY,
    serial      TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    cert        BLOB NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0,
    created     INTEGER NOT NULL,
    generation         INTEGER NOT NULL DEFAULT 0,
    mac         BLOB
);
CREATE TABLE IF NOT EXISTS revocations (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint BLOB NOT NULL,
    at          INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS log_terminal_revoked AFTER UPDATE OF revoked ON terminals
    WHEN NEW.revoked AND NOT OLD.revoked
BEGIN
    INSERT INTO revocations (fingerprint, at) VALUES (NEW.fingerprint, unixepoch());
END;
CREATE TRIGGER IF NOT EXISTS log_terminal_deleted AFTER DELETE ON terminals
    WHEN NOT OLD.revoked
BEGIN
    INSERT INTO revocations (fingerprint, at) VALUES (OLD.fingerprint, unixepoch());
END;
-- A user deleted without foreign keys on (sqlite3 by hand) keeps its
-- terminal rows; with them on, the cascade has removed and logged them.
CREATE TRIGGER IF NOT EXISTS log_user_deleted AFTER DELETE ON users
BEGIN
    INSERT INTO revocations (fingerprint, at)
        SELECT fingerprint, unixepoch() FROM terminals WHERE user_id = OLD.id AND NOT revoked;
END;
CREATE TABLE IF NOT EXISTS markets (
    id       TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    ca_pem   TEXT NOT NULL,
    created  INTEGER NOT NULL,
    generation      INTEGER NOT NULL DEFAULT 0,
    mac      BLOB
);
";

/// The tables whose rows are sealed, as `keybroker check` walks them.
pub const SEALED: [&str; 4] = ["users", "terminals", "markets", "meta"];

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[derive(Clone, Debug)]
pub struct UserRecord {
    pub id: String,
    pub mail: String,
    pub cert: Vec<u8>,
    pub public_key: Vec<u8>,
    pub wrapped_key: Vec<u8>,
    pub pw_access: String,
    pub pw_release: String,
    pub failures: u32,
    pub locked: bool,
}

#[derive(Clone, Debug)]
pub struct TerminalRecord {
    pub fingerprint: Vec<u8>,
    pub serial: String,
    pub user_id: String,
    pub cert: Vec<u8>,
    pub revoked: bool,
}

#[derive(Clone, Debug)]
pub struct MarketRecord {
    pub id: String,
    pub endpoint: String,
    pub ca_pem: String,
}

/// A sealed table's record: its key, and its fields in MAC order.
trait Row: Clone {
    const TABLE: &'static str;
    /// The key column.
    const KEY: &'static str;
    /// The columns read: the record's fields, then `created, generation, mac`.
    const COLUMNS: &'static str;
    /// How many of [`Row::COLUMNS`] are the record's.
    const FIELDS: usize;
    /// The key as `keybroker check` and the audit lines name it.
    fn key(&self) -> String;
    fn canon(&self, created: i64, generation: i64) -> Canon;
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

impl Row for UserRecord {
    const TABLE: &'static str = "users";
    const KEY: &'static str = "id";
    const COLUMNS: &'static str = "id, mail, cert, public_key, wrapped_key, pw_access, pw_release, \
                                   failures, locked, created, generation, mac";
    const FIELDS: usize = 9;
    fn key(&self) -> String {
        self.id.clone()
    }
    fn canon(&self, created: i64, generation: i64) -> Canon {
        Canon::new(Self::TABLE, self.id.as_bytes())
            .bytes(self.mail.as_bytes())
            .bytes(&self.cert)
            .bytes(&self.public_key)
            .bytes(&self.wrapped_key)
            .bytes(self.pw_access.as_bytes())
            .bytes(self.pw_release.as_bytes())
            .int(self.failures.into())
            .int(self.locked.into())
            .int(created)
            .int(generation)
    }
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            mail: r.get(1)?,
            cert: r.get(2)?,
            public_key: r.get(3)?,
            wrapped_key: r.get(4)?,
            pw_access: r.get(5)?,
            pw_release: r.get(6)?,
            failures: r.get(7)?,
            locked: r.get(8)?,
        })
    }
}

impl Row for TerminalRecord {
    const TABLE: &'static str = "terminals";
    const KEY: &'static str = "fingerprint";
    const COLUMNS: &'static str =
        "fingerprint, serial, user_id, cert, revoked, created, generation, mac";
    const FIELDS: usize = 5;
    fn key(&self) -> String {
        hex::encode(&self.fingerprint)
    }
    fn canon(&self, created: i64, generation: i64) -> Canon {
        Canon::new(Self::TABLE, &self.fingerprint)
            .bytes(self.serial.as_bytes())
            .bytes(self.user_id.as_bytes())
            .bytes(&self.cert)
            .int(self.revoked.into())
            .int(created)
            .int(generation)
    }
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            fingerprint: r.get(0)?,
            serial: r.get(1)?,
            user_id: r.get(2)?,
            cert: r.get(3)?,
            revoked: r.get(4)?,
        })
    }
}

impl Row for MarketRecord {
    const TABLE: &'static str = "markets";
    const KEY: &'static str = "id";
    const COLUMNS: &'static str = "id, endpoint, ca_pem, created, generation, mac";
    const FIELDS: usize = 3;
    fn key(&self) -> String {
        self.id.clone()
    }
    fn canon(&self, created: i64, generation: i64) -> Canon {
        Canon::new(Self::TABLE, self.id.as_bytes())
            .bytes(self.endpoint.as_bytes())
            .bytes(self.ca_pem.as_bytes())
            .int(created)
            .int(generation)
    }
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            endpoint: r.get(1)?,
            ca_pem: r.get(2)?,
        })
    }
}

#[derive(Clone)]
struct MetaRecord {
    key: String,
    value: Vec<u8>,
}

impl Row for MetaRecord {
    const TABLE: &'static str = "meta";
    const KEY: &'static str = "key";
    // meta has no `created` column: 0 stands in.
    const COLUMNS: &'static str = "key, value, 0, generation, mac";
    const FIELDS: usize = 2;
    fn key(&self) -> String {
        self.key.clone()
    }
    fn canon(&self, created: i64, generation: i64) -> Canon {
        Canon::new(Self::TABLE, self.key.as_bytes())
            .bytes(&self.value)
            .int(created)
            .int(generation)
    }
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            key: r.get(0)?,
            value: r.get(1)?,
        })
    }
}

/// A record as read, with what its seal covers.
struct Sealed<T> {
    rec: T,
    created: i64,
    generation: i64,
    mac: Option<Vec<u8>>,
}

fn sealed<T: Row>(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sealed<T>> {
    Ok(Sealed {
        rec: T::from_row(r)?,
        created: r.get(T::FIELDS)?,
        generation: r.get(T::FIELDS + 1)?,
        mac: r.get(T::FIELDS + 2)?,
    })
}

/// What `keybroker check` found.
pub struct CheckReport {
    pub rows: usize,
    pub bad: Vec<BadRow>,
}

/// How many times a write reads a row again that changed under it.
const WRITE_ATTEMPTS: usize = 8;

pub struct Store {
    conn: Connection,
    sealer: Option<Sealer>,
}

/// Adds the columns rows are sealed with to a registry made before them.
fn add_seal_columns(conn: &Connection) -> Result<()> {
    for table in SEALED {
        for (col, def) in [
            ("generation", "INTEGER NOT NULL DEFAULT 0"),
            ("mac", "BLOB"),
        ] {
            let has: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, col],
                |r| r.get(0),
            )?;
            if has {
                continue;
            }
            match conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {col} {def}")) {
                // Another connection added it meanwhile.
                Err(e) if e.to_string().contains("duplicate column") => {}
                r => r.with_context(|| format!("adding {table}.{col}"))?,
            }
        }
    }
    Ok(())
}

/// The audit line of a row refused.
fn audit(e: &anyhow::Error, what: &str) {
    if let Some(bad) = e.downcast_ref::<BadRow>() {
        tracing::warn!(target: "audit", table = bad.table, key = %bad.key, why = %bad.why,
            "registry row {what}: it fails its check (see `keybroker check`)");
    }
}

impl Store {
    /// The registry without its HSM key: only the revocation log can be
    /// read (the revocation watcher, the readiness check).
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA).context("creating schema")?;
        add_seal_columns(&conn)?;
        Ok(Self { conn, sealer: None })
    }

    /// The registry with its rows sealed and checked by `sealer`.
    pub fn open_sealed(path: &Path, sealer: Sealer) -> Result<Self> {
        let mut s = Self::open(path)?;
        s.sealer = Some(sealer);
        Ok(s)
    }

    fn sealer(&self) -> Result<&Sealer> {
        self.sealer
            .as_ref()
            .context("the registry was opened without its HSM key")
    }

    /// Checks a row read. `Err`: a [`BadRow`], or the HSM failed.
    fn verify<T: Row>(&self, row: &Sealed<T>) -> Result<()> {
        let canon = row.rec.canon(row.created, row.generation);
        self.sealer()?.verify(&ReadRow {
            table: T::TABLE,
            key: row.rec.key(),
            canon: &canon,
            generation: row.generation,
            mac: row.mac.as_deref(),
        })
    }

    /// `T`'s row `key`, checked; a bad one is refused with an audit line.
    fn get<T: Row>(&self, key: &dyn rusqlite::ToSql) -> Result<Option<Sealed<T>>> {
        self.sealer()?;
        let row = self
            .conn
            .prepare_cached(&format!(
                "SELECT {} FROM {} WHERE {} = ?1",
                T::COLUMNS,
                T::TABLE,
                T::KEY
            ))?
            .query_row([key], sealed::<T>)
            .optional()?;
        if let Some(row) = &row {
            self.verify(row).inspect_err(|e| audit(e, "refused"))?;
        }
        Ok(row)
    }

    /// `T`'s rows (`filter`: an SQL tail with `?1`), each checked: a bad
    /// one as its [`BadRow`]. An HSM failure fails the whole listing.
    fn all<T: Row>(&self, filter: &str, arg: Option<&str>) -> Result<Vec<Result<T, BadRow>>> {
        let mut st =
            self.conn
                .prepare(&format!("SELECT {} FROM {} {filter}", T::COLUMNS, T::TABLE))?;
        let params: &[&dyn rusqlite::ToSql] = if filter.contains("?1") { &[&arg] } else { &[] };
        let rows = st
            .query_map(params, sealed::<T>)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|row| match self.verify(&row) {
                Ok(()) => Ok(Ok(row.rec)),
                Err(e) => e.downcast::<BadRow>().map(Err),
            })
            .collect()
    }

    /// The generation and MAC a new row gets: (created, generation, mac).
    fn seal_new<T: Row>(&self, rec: &T) -> Result<(i64, i64, [u8; 32])> {
        let (created, generation) = (now_secs(), next_gen(0));
        Ok((
            created,
            generation,
            self.sealer()?.seal(&rec.canon(created, generation))?,
        ))
    }

    /// Reads and checks `T`'s row `key`, changes it with `f`, and has
    /// `write` store it (new record, generation, MAC, the row as read; it
    /// returns the rows changed, 0 when the stored row is no longer the
    /// one read). Reads again if the row changed meanwhile. `f` returns
    /// false to write nothing. `None`: no such row.
    fn update<T: Row>(
        &self,
        key: &dyn rusqlite::ToSql,
        f: impl Fn(&mut T) -> bool,
        write: impl Fn(&T, i64, &[u8], &Sealed<T>) -> rusqlite::Result<usize>,
    ) -> Result<Option<T>> {
        for _ in 0..WRITE_ATTEMPTS {
            let Some(old) = self.get::<T>(key)? else {
                return Ok(None);
            };
            let mut new = old.rec.clone();
            if !f(&mut new) {
                return Ok(Some(new));
            }
            let generation = next_gen(old.generation);
            let mac = self.sealer()?.seal(&new.canon(old.created, generation))?;
            if write(&new, generation, &mac, &old)? == 1 {
                self.sealer()?.written(T::TABLE, &new.key(), generation);
                return Ok(Some(new));
            }
        }
        anyhow::bail!(
            "{} row changed {WRITE_ATTEMPTS} times while being written",
            T::TABLE
        )
    }

    /// Changes user `id` with `f` (see [`Store::update`]).
    fn update_user(
        &self,
        id: &str,
        f: impl Fn(&mut UserRecord) -> bool,
    ) -> Result<Option<UserRecord>> {
        self.update(&id, f, |u, generation, mac, old| {
            self.conn
                .prepare_cached(
                    "UPDATE users SET wrapped_key = ?2, pw_release = ?3, failures = ?4, locked = ?5,
                                      generation = ?6, mac = ?7, pw_access = ?10
                     WHERE id = ?1 AND generation = ?8 AND mac IS ?9",
                )?
                .execute(params![
                    u.id,
                    u.wrapped_key,
                    u.pw_release,
                    u.failures,
                    u.locked,
                    generation,
                    mac,
                    old.generation,
                    old.mac,
                    u.pw_access
                ])
        })
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get::<MetaRecord>(&key)?.map(|m| m.rec.value))
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        let rec = MetaRecord {
            key: key.into(),
            value: value.into(),
        };
        // meta keeps no `created`: sealed with 0, as it is read.
        let generation = next_gen(0);
        let mac = self.sealer()?.seal(&rec.canon(0, generation))?;
        self.conn.execute(
            "INSERT INTO meta (key, value, generation, mac) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value, generation = excluded.generation, mac = excluded.mac",
            params![key, value, generation, mac],
        )?;
        self.sealer()?.written(MetaRecord::TABLE, key, generation);
        Ok(())
    }

    pub fn user_add(&self, u: &UserRecord) -> Result<()> {
        let u = UserRecord {
            failures: 0,
            locked: false,
            ..u.clone()
        };
        let (created, generation, mac) = self.seal_new(&u)?;
        self.conn
            .execute(
                "INSERT INTO users (id, mail, cert, public_key, wrapped_key, pw_access, pw_release, created, generation, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![u.id, u.mail, u.cert, u.public_key, u.wrapped_key, u.pw_access, u.pw_release, created, generation, mac],
            )
            .with_context(|| format!("adding user {} (does it exist already?)", u.id))?;
        self.sealer()?.written(UserRecord::TABLE, &u.id, generation);
        Ok(())
    }

    /// The user's row, checked. Statements of the login path are cached
    /// (prepared once per connection): parsing them was a tenth of an auth
    /// thread's CPU under the `resume` bench.
    pub fn user_get(&self, id: &str) -> Result<Option<UserRecord>> {
        Ok(self.get::<UserRecord>(&id)?.map(|u| u.rec))
    }

    /// Every user, by id; a row that fails its check as its [`BadRow`].
    pub fn user_list(&self) -> Result<Vec<Result<UserRecord, BadRow>>> {
        self.all("ORDER BY id", None)
    }

    pub fn user_remove(&self, id: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM users WHERE id = ?1", [id])? > 0)
    }

    /// Counts one failed password attempt; locks at `max`. Returns
    /// (failures, locked) after the update. Refused if the row fails its
    /// check: a counter is never sealed over a row nobody vouches for.
    pub fn record_failure(&self, id: &str, max: u32) -> Result<(u32, bool)> {
        let u = self
            .update_user(id, |u| {
                u.failures = u.failures.saturating_add(1);
                u.locked |= u.failures >= max;
                true
            })?
            .with_context(|| format!("no user {id}"))?;
        Ok((u.failures, u.locked))
    }

    pub fn reset_failures(&self, id: &str) -> Result<()> {
        self.update_user(id, |u| std::mem::take(&mut u.failures) != 0)?;
        Ok(())
    }

    /// Admin unlock: clears the lock and the counter. Refused if the row
    /// fails its check (restore it, or remove and add the user again).
    pub fn unlock(&self, id: &str) -> Result<bool> {
        Ok(self
            .update_user(id, |u| {
                u.failures = 0;
                u.locked = false;
                true
            })?
            .is_some())
    }

    /// A new first-password hash for user `id`; false if there is none.
    pub fn set_access_password(&self, id: &str, phc: &str) -> Result<bool> {
        Ok(self
            .update_user(id, |u| {
                u.pw_access = phc.to_owned();
                true
            })?
            .is_some())
    }

    /// A home-card key wrapped again: the user's `old` blob becomes
    /// `wrapped`, with the binding `pw_release` (a migration from the plain
    /// master key, or a second-password change). False if the row holds
    /// another blob by now (another release or change came first).
    pub fn rebind(&self, id: &str, old: &[u8], wrapped: &[u8], pw_release: &str) -> Result<bool> {
        let u = self.update_user(id, |u| {
            if u.wrapped_key != old {
                return false;
            }
            u.wrapped_key = wrapped.to_vec();
            u.pw_release = pw_release.to_owned();
            true
        })?;
        Ok(u.is_some_and(|u| u.wrapped_key == wrapped))
    }

    pub fn terminal_add(&self, fp: &[u8], serial: &str, user: &str, cert: &[u8]) -> Result<()> {
        let t = TerminalRecord {
            fingerprint: fp.to_vec(),
            serial: serial.into(),
            user_id: user.into(),
            cert: cert.to_vec(),
            revoked: false,
        };
        let (created, generation, mac) = self.seal_new(&t)?;
        self.conn.execute(
            "INSERT INTO terminals (fingerprint, serial, user_id, cert, created, generation, mac)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![fp, serial, user, cert, created, generation, mac],
        )?;
        self.sealer()?
            .written(TerminalRecord::TABLE, &t.key(), generation);
        Ok(())
    }

    pub fn terminal_get(&self, fp: &[u8]) -> Result<Option<TerminalRecord>> {
        Ok(self.get::<TerminalRecord>(&fp)?.map(|t| t.rec))
    }

    /// The terminals (of `user`, or all), by user and serial; a row that
    /// fails its check as its [`BadRow`].
    pub fn terminal_list(&self, user: Option<&str>) -> Result<Vec<Result<TerminalRecord, BadRow>>> {
        self.all(
            "WHERE ?1 IS NULL OR user_id = ?1 ORDER BY user_id, serial",
            user,
        )
    }

    /// Revokes (keeps the row, refuses the certificate) a terminal by
    /// serial. A row that fails its check is revoked all the same but not
    /// sealed again, so it stays refused and reported.
    pub fn terminal_revoke(&self, serial: &str) -> Result<bool> {
        let fp: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT fingerprint FROM terminals WHERE serial = ?1",
                [serial],
                |r| r.get(0),
            )
            .optional()?;
        let Some(fp) = fp else { return Ok(false) };
        let sealed = self.update(
            &fp,
            |t: &mut TerminalRecord| !std::mem::replace(&mut t.revoked, true),
            |t, generation, mac, old| {
                self.conn
                    .prepare_cached(
                        "UPDATE terminals SET revoked = ?2, generation = ?3, mac = ?4
                         WHERE fingerprint = ?1 AND generation = ?5 AND mac IS ?6",
                    )?
                    .execute(params![
                        t.fingerprint,
                        t.revoked,
                        generation,
                        mac,
                        old.generation,
                        old.mac
                    ])
            },
        );
        match sealed {
            Err(e) if e.downcast_ref::<BadRow>().is_some() => {
                self.conn.execute(
                    "UPDATE terminals SET revoked = 1 WHERE fingerprint = ?1",
                    [&fp],
                )?;
                Ok(true)
            }
            r => Ok(r?.is_some()),
        }
    }

    /// The newest entry of the revocation log (0: none yet). A broker
    /// starts watching from here: terminals revoked before it started are
    /// refused at login.
    pub fn revocations_head(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM revocations", [], |r| {
                r.get(0)
            })?)
    }

    /// Terminals revoked or deleted after log entry `after`: (entry,
    /// fingerprint), oldest first. One index seek when there are none.
    pub fn revocations_since(&self, after: i64) -> Result<Vec<(i64, [u8; 32])>> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, fingerprint FROM revocations WHERE seq > ?1 ORDER BY seq",
        )?;
        let rows = st.query_map([after], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, fp) = row?;
            // Fingerprints are SHA-256; anything else was never a terminal.
            if let Ok(fp) = <[u8; 32]>::try_from(fp) {
                out.push((seq, fp));
            }
        }
        Ok(out)
    }

    pub fn market_add(&self, m: &MarketRecord) -> Result<()> {
        let (created, generation, mac) = self.seal_new(m)?;
        self.conn
            .execute(
                "INSERT INTO markets (id, endpoint, ca_pem, created, generation, mac) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![m.id, m.endpoint, m.ca_pem, created, generation, mac],
            )
            .with_context(|| format!("adding market {} (does it exist already?)", m.id))?;
        self.sealer()?
            .written(MarketRecord::TABLE, &m.id, generation);
        Ok(())
    }

    /// Every market as stored, unchecked: for display where the HSM is not
    /// at hand (`keybroker status` without the PIN), never to act on.
    pub fn markets_unchecked(&self) -> Result<Vec<MarketRecord>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {} FROM markets ORDER BY id",
            MarketRecord::COLUMNS
        ))?;
        let rows = st.query_map([], MarketRecord::from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether a market row with this id exists, checked or not (its id is
    /// taken either way).
    pub fn has_market(&self, id: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) > 0 FROM markets WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?)
    }

    /// Every market, by id; a row that fails its check as its [`BadRow`].
    pub fn market_list(&self) -> Result<Vec<Result<MarketRecord, BadRow>>> {
        self.all("ORDER BY id", None)
    }

    pub fn market_remove(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM markets WHERE id = ?1", [id])?
            > 0)
    }

    /// Checks every sealed row (`keybroker check`). Rolled-back rows show
    /// only against what this process has seen, so a fresh `check` reports
    /// edits, insertions, moved and unsealed rows.
    pub fn check(&self) -> Result<CheckReport> {
        let mut rows = 0;
        let mut bad = Vec::new();
        let mut add = |found: Vec<Result<(), BadRow>>| {
            rows += found.len();
            bad.extend(found.into_iter().filter_map(Result::err));
        };
        add(drop_ok(self.all::<UserRecord>("ORDER BY id", None)?));
        add(drop_ok(
            self.all::<TerminalRecord>("ORDER BY user_id, serial", None)?,
        ));
        add(drop_ok(self.all::<MarketRecord>("ORDER BY id", None)?));
        add(drop_ok(self.all::<MetaRecord>("ORDER BY key", None)?));
        Ok(CheckReport { rows, bad })
    }

    /// How many rows carry a MAC (right or wrong).
    pub fn sealed_rows(&self) -> Result<i64> {
        let mut n = 0;
        for table in SEALED {
            n += self.conn.query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE mac IS NOT NULL"),
                [],
                |r| r.get::<_, i64>(0),
            )?;
        }
        Ok(n)
    }

    /// Seals the rows that have no MAC, as they are: once, on a registry
    /// from before row MACs (`keybroker init` decides when). Rows whose MAC
    /// is wrong stay as they are. Returns the rows sealed, as `table/key`.
    pub fn seal_unsealed(&self) -> Result<Vec<String>> {
        let mut done = self.seal_table::<UserRecord>()?;
        done.extend(self.seal_table::<TerminalRecord>()?);
        done.extend(self.seal_table::<MarketRecord>()?);
        done.extend(self.seal_table::<MetaRecord>()?);
        Ok(done)
    }

    fn seal_table<T: Row>(&self) -> Result<Vec<String>> {
        let rows = self
            .conn
            .prepare(&format!(
                "SELECT {}, {} FROM {} WHERE mac IS NULL",
                T::COLUMNS,
                T::KEY,
                T::TABLE
            ))?
            .query_map([], |r| {
                Ok((
                    sealed::<T>(r)?,
                    r.get::<_, rusqlite::types::Value>(T::FIELDS + 3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut done = Vec::new();
        for (row, key) in rows {
            let generation = next_gen(row.generation);
            let mac = self
                .sealer()?
                .seal(&row.rec.canon(row.created, generation))?;
            let changed = self.conn.execute(
                &format!(
                    "UPDATE {} SET generation = ?2, mac = ?3 WHERE {} = ?1 AND generation = ?4 AND mac IS NULL",
                    T::TABLE,
                    T::KEY
                ),
                params![key, generation, mac, row.generation],
            )?;
            if changed == 1 {
                done.push(format!("{}/{}", T::TABLE, row.rec.key()));
            }
        }
        Ok(done)
    }
}

fn drop_ok<T>(rows: Vec<Result<T, BadRow>>) -> Vec<Result<(), BadRow>> {
    rows.into_iter().map(|r| r.map(drop)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rowmac::{SoftRowMac, Why};

    fn open(path: &Path) -> Store {
        Store::open_sealed(
            path,
            Sealer::new(Box::new(SoftRowMac([7; 32])), Default::default()),
        )
        .unwrap()
    }

    fn user(id: &str) -> UserRecord {
        UserRecord {
            id: id.into(),
            mail: format!("{id}@example.org"),
            cert: vec![1],
            public_key: vec![2],
            wrapped_key: format!("{id}-key").into_bytes(),
            pw_access: "a".into(),
            pw_release: "b".into(),
            failures: 0,
            locked: false,
        }
    }

    fn why(r: Result<impl std::fmt::Debug>) -> Why {
        r.unwrap_err().downcast::<BadRow>().expect("a BadRow").why
    }

    #[test]
    fn failures_lock_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let s = open(&path);
            s.user_add(&user("alice")).unwrap();
            assert_eq!(s.record_failure("alice", 3).unwrap(), (1, false));
            assert_eq!(s.record_failure("alice", 3).unwrap(), (2, false));
        }
        let s = open(&path);
        assert_eq!(s.record_failure("alice", 3).unwrap(), (3, true));
        assert!(s.user_get("alice").unwrap().unwrap().locked);
        assert!(s.unlock("alice").unwrap());
        let u = s.user_get("alice").unwrap().unwrap();
        assert!(!u.locked);
        assert_eq!(u.failures, 0);
        assert!(!s.unlock("nobody").unwrap());
    }

    #[test]
    fn terminals_map_to_users_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("t.db"));
        s.user_add(&user("bob")).unwrap();
        s.terminal_add(&[9; 32], "t1", "bob", &[0]).unwrap();
        let t = s.terminal_get(&[9; 32]).unwrap().unwrap();
        assert_eq!(t.user_id, "bob");
        assert!(!t.revoked);
        assert!(s.terminal_revoke("t1").unwrap());
        assert!(s.terminal_get(&[9; 32]).unwrap().unwrap().revoked);
        assert!(!s.terminal_revoke("t2").unwrap());
        assert!(s.user_add(&user("bob")).is_err());
    }

    #[test]
    fn revoking_or_removing_logs_each_terminal_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("t.db"));
        s.user_add(&user("bob")).unwrap();
        s.user_add(&user("eve")).unwrap();
        s.terminal_add(&[1; 32], "t1", "bob", &[0]).unwrap();
        s.terminal_add(&[2; 32], "t2", "bob", &[0]).unwrap();
        s.terminal_add(&[3; 32], "t3", "eve", &[0]).unwrap();
        assert_eq!(s.revocations_head().unwrap(), 0);
        assert!(s.terminal_revoke("t1").unwrap());
        // Revoking again, or deleting a revoked terminal, adds nothing.
        assert!(s.terminal_revoke("t1").unwrap());
        let head = s.revocations_head().unwrap();
        assert_eq!(s.revocations_since(0).unwrap(), vec![(head, [1; 32])]);
        // Removing a user logs its terminals that were still live, once.
        assert!(s.user_remove("bob").unwrap());
        let after: Vec<_> = s.revocations_since(head).unwrap();
        assert_eq!(after.iter().map(|e| e.1).collect::<Vec<_>>(), vec![[2; 32]]);
        assert!(
            s.revocations_since(s.revocations_head().unwrap())
                .unwrap()
                .is_empty()
        );
        assert!(s.terminal_get(&[3; 32]).unwrap().is_some());
    }

    /// What someone who can write the file but not use the key can do to
    /// each sealed table, and how the store answers.
    #[test]
    fn rows_changed_outside_the_store_are_refused_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let s = open(&path);
        for u in ["alice", "bob", "carol"] {
            s.user_add(&user(u)).unwrap();
        }
        s.terminal_add(&[1; 32], "t1", "alice", &[0]).unwrap();
        s.terminal_add(&[2; 32], "t2", "bob", &[0]).unwrap();
        assert!(s.terminal_revoke("t2").unwrap());
        s.market_add(&MarketRecord {
            id: "m1".into(),
            endpoint: "h:1".into(),
            ca_pem: "pem".into(),
        })
        .unwrap();
        s.meta_put("ca", b"der").unwrap();
        assert_eq!(open(&path).check().unwrap().bad, []);

        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "UPDATE users SET pw_access = 'known', pw_release = 'known' WHERE id = 'alice';
             UPDATE users SET (wrapped_key, mac) = (SELECT wrapped_key, mac FROM users WHERE id = 'carol')
                 WHERE id = 'bob';
             UPDATE terminals SET user_id = 'carol' WHERE serial = 't1';
             UPDATE terminals SET revoked = 0 WHERE serial = 't2';
             UPDATE markets SET endpoint = 'evil:1';
             UPDATE meta SET value = x'00';",
        )
        .unwrap();
        // A fresh process, as after a restart: each edit still shows.
        let s = open(&path);
        assert_eq!(why(s.user_get("alice")), Why::Mismatch);
        assert_eq!(
            why(s.user_get("bob")),
            Why::Mismatch,
            "carol's key moved to bob"
        );
        s.user_get("carol").unwrap().unwrap();
        assert_eq!(why(s.terminal_get(&[1; 32])), Why::Mismatch);
        assert_eq!(why(s.terminal_get(&[2; 32])), Why::Mismatch);
        assert_eq!(why(s.meta_get("ca")), Why::Mismatch);
        assert!(s.market_list().unwrap()[0].is_err());
        // No counter is sealed over a bad row, and no unlock launders one.
        assert_eq!(why(s.record_failure("alice", 3)), Why::Mismatch);
        assert_eq!(why(s.unlock("alice")), Why::Mismatch);
        // Revoking a bad terminal still revokes; the row stays bad.
        assert!(s.terminal_revoke("t1").unwrap());
        assert_eq!(why(s.terminal_get(&[1; 32])), Why::Mismatch);
        let report = s.check().unwrap();
        assert_eq!(report.rows, 3 + 2 + 1 + 1);
        let mut bad: Vec<String> = report
            .bad
            .iter()
            .map(|b| format!("{}/{}", b.table, b.key))
            .collect();
        bad.sort();
        assert_eq!(
            bad,
            [
                "markets/m1".to_owned(),
                "meta/ca".into(),
                format!("terminals/{}", hex::encode([1; 32])),
                format!("terminals/{}", hex::encode([2; 32])),
                "users/alice".into(),
                "users/bob".into(),
            ]
        );
        // Another key (another deployment's HSM) vouches for nothing here.
        let other = Store::open_sealed(
            &path,
            Sealer::new(Box::new(SoftRowMac([8; 32])), Default::default()),
        )
        .unwrap();
        assert_eq!(why(other.user_get("carol")), Why::Mismatch);
    }

    #[test]
    fn a_row_put_back_is_refused_by_the_process_that_saw_it_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let s = open(&path);
        s.user_add(&user("bob")).unwrap();
        let raw = Connection::open(&path).unwrap();
        let snapshot = "SELECT failures, locked, generation, mac FROM users WHERE id = 'bob'";
        let before: (u32, bool, i64, Vec<u8>) = raw
            .query_row(snapshot, [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap();
        assert_eq!(s.record_failure("bob", 3).unwrap(), (1, false));
        assert_eq!(s.record_failure("bob", 3).unwrap(), (2, false));
        raw.execute(
            "UPDATE users SET failures = ?1, locked = ?2, generation = ?3, mac = ?4 WHERE id = 'bob'",
            params![before.0, before.1, before.2, before.3],
        )
        .unwrap();
        assert!(matches!(why(s.user_get("bob")), Why::RolledBack { .. }));
        // A process that never saw the newer row cannot tell: the window
        // docs/SECURITY.md states.
        assert_eq!(open(&path).user_get("bob").unwrap().unwrap().failures, 0);
    }

    #[test]
    fn rows_from_before_the_seals_are_refused_until_sealed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        // A registry as an older version left it: no generation, no mac.
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "CREATE TABLE users (id TEXT PRIMARY KEY, mail TEXT NOT NULL, cert BLOB NOT NULL,
                 public_key BLOB NOT NULL, wrapped_key BLOB NOT NULL, pw_access TEXT NOT NULL,
                 pw_release TEXT NOT NULL, failures INTEGER NOT NULL DEFAULT 0,
                 locked INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL);
             INSERT INTO users (id, mail, cert, public_key, wrapped_key, pw_access, pw_release, created)
                 VALUES ('old', 'o@example.org', x'01', x'02', x'03', 'a', 'b', 1);",
        )
        .unwrap();
        let s = open(&path);
        assert_eq!(why(s.user_get("old")), Why::Unsealed);
        assert_eq!(s.check().unwrap().bad.len(), 1);
        assert_eq!(s.seal_unsealed().unwrap(), ["users/old"]);
        assert_eq!(s.user_get("old").unwrap().unwrap().mail, "o@example.org");
        assert!(s.check().unwrap().bad.is_empty());
        assert!(s.seal_unsealed().unwrap().is_empty());
        // An edited row is never sealed by it.
        raw.execute("UPDATE users SET mail = 'x@example.org'", [])
            .unwrap();
        assert!(s.seal_unsealed().unwrap().is_empty());
        assert_eq!(why(s.user_get("old")), Why::Mismatch);
    }

    #[test]
    fn a_store_without_the_key_reads_only_the_revocation_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
        assert_eq!(s.revocations_head().unwrap(), 0);
        assert!(s.user_get("bob").is_err());
        assert!(s.user_add(&user("bob")).is_err());
    }
}
