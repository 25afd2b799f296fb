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
//! Triggers append to `revocations` whenever a terminal is revoked or
//! deleted, or its user is (removing a user deletes its terminals by
//! cascade), whoever does it: the CLI, another node, or `sqlite3` by hand. Every running broker
//! polls that log and ends the sessions of those terminals
//! (`broker::revoke`), so a revocation needs no message to the brokers.

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY,
    mail        TEXT NOT NULL,
    cert        BLOB NOT NULL,
    public_key  BLOB NOT NULL,
    wrapped_key BLOB NOT NULL,
    pw_access   TEXT NOT NULL,
    pw_release  TEXT NOT NULL,
    failures    INTEGER NOT NULL DEFAULT 0,
    locked      INTEGER NOT NULL DEFAULT 0,
    created     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS terminals (
    fingerprint BLOB PRIMARY KEY,
    serial      TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    cert        BLOB NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0,
    created     INTEGER NOT NULL
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
    created  INTEGER NOT NULL
);
";

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
    pub revoked: bool,
}

impl TerminalRecord {
    /// From `fingerprint, serial, user_id, revoked`, in that order.
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            fingerprint: r.get(0)?,
            serial: r.get(1)?,
            user_id: r.get(2)?,
            revoked: r.get(3)?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct MarketRecord {
    pub id: String,
    pub endpoint: String,
    pub ca_pem: String,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA).context("creating schema")?;
        Ok(Self { conn })
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn user_add(&self, u: &UserRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO users (id, mail, cert, public_key, wrapped_key, pw_access, pw_release, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![u.id, u.mail, u.cert, u.public_key, u.wrapped_key, u.pw_access, u.pw_release, now_secs()],
            )
            .with_context(|| format!("adding user {} (does it exist already?)", u.id))?;
        Ok(())
    }

    /// Statements of the login path are cached (prepared once per
    /// connection): parsing them was a tenth of an auth thread's CPU under
    /// the `resume` bench.
    pub fn user_get(&self, id: &str) -> Result<Option<UserRecord>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT id, mail, cert, public_key, wrapped_key, pw_access, pw_release, failures, locked
                 FROM users WHERE id = ?1",
            )?
            .query_row(
                [id],
                |r| {
                    Ok(UserRecord {
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
                },
            )
            .optional()?)
    }

    /// (id, mail, failures, locked) of every user.
    pub fn user_list(&self) -> Result<Vec<(String, String, u32, bool)>> {
        let mut st = self
            .conn
            .prepare("SELECT id, mail, failures, locked FROM users ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn user_remove(&self, id: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM users WHERE id = ?1", [id])? > 0)
    }

    /// Counts one failed password attempt; locks at `max`. Returns
    /// (failures, locked) after the update, atomically.
    pub fn record_failure(&self, id: &str, max: u32) -> Result<(u32, bool)> {
        Ok(self
            .conn
            .prepare_cached(
                "UPDATE users SET failures = failures + 1,
                              locked = CASE WHEN failures + 1 >= ?2 THEN 1 ELSE locked END
             WHERE id = ?1 RETURNING failures, locked",
            )?
            .query_row(params![id, max], |r| Ok((r.get(0)?, r.get(1)?)))?)
    }

    pub fn reset_failures(&self, id: &str) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE users SET failures = 0 WHERE id = ?1 AND failures != 0")?
            .execute([id])?;
        Ok(())
    }

    /// Admin unlock: clears the lock and the counter.
    pub fn unlock(&self, id: &str) -> Result<bool> {
        Ok(self.conn.execute(
            "UPDATE users SET failures = 0, locked = 0 WHERE id = ?1",
            [id],
        )? > 0)
    }

    pub fn terminal_add(&self, fp: &[u8], serial: &str, user: &str, cert: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO terminals (fingerprint, serial, user_id, cert, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![fp, serial, user, cert, now_secs()],
        )?;
        Ok(())
    }

    pub fn terminal_get(&self, fp: &[u8]) -> Result<Option<TerminalRecord>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT fingerprint, serial, user_id, revoked FROM terminals WHERE fingerprint = ?1",
            )?
            .query_row([fp], TerminalRecord::from_row)
            .optional()?)
    }

    pub fn terminal_list(&self, user: Option<&str>) -> Result<Vec<TerminalRecord>> {
        let mut st = self.conn.prepare(
            "SELECT fingerprint, serial, user_id, revoked FROM terminals
             WHERE ?1 IS NULL OR user_id = ?1 ORDER BY user_id, serial",
        )?;
        let rows = st.query_map([user], TerminalRecord::from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes (keeps the row, refuses the certificate) a terminal by serial.
    pub fn terminal_revoke(&self, serial: &str) -> Result<bool> {
        Ok(self.conn.execute(
            "UPDATE terminals SET revoked = 1 WHERE serial = ?1",
            [serial],
        )? > 0)
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
        self.conn
            .execute(
                "INSERT INTO markets (id, endpoint, ca_pem, created) VALUES (?1, ?2, ?3, ?4)",
                params![m.id, m.endpoint, m.ca_pem, now_secs()],
            )
            .with_context(|| format!("adding market {} (does it exist already?)", m.id))?;
        Ok(())
    }

    pub fn market_list(&self) -> Result<Vec<MarketRecord>> {
        let mut st = self
            .conn
            .prepare("SELECT id, endpoint, ca_pem FROM markets ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(MarketRecord {
                id: r.get(0)?,
                endpoint: r.get(1)?,
                ca_pem: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn market_remove(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM markets WHERE id = ?1", [id])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> UserRecord {
        UserRecord {
            id: id.into(),
            mail: format!("{id}@example.org"),
            cert: vec![1],
            public_key: vec![2],
            wrapped_key: vec![3],
            pw_access: "a".into(),
            pw_release: "b".into(),
            failures: 0,
            locked: false,
        }
    }

    #[test]
    fn failures_lock_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let s = Store::open(&path).unwrap();
            s.user_add(&user("alice")).unwrap();
            assert_eq!(s.record_failure("alice", 3).unwrap(), (1, false));
            assert_eq!(s.record_failure("alice", 3).unwrap(), (2, false));
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.record_failure("alice", 3).unwrap(), (3, true));
        assert!(s.user_get("alice").unwrap().unwrap().locked);
        assert!(s.unlock("alice").unwrap());
        let u = s.user_get("alice").unwrap().unwrap();
        assert!(!u.locked);
        assert_eq!(u.failures, 0);
    }

    #[test]
    fn terminals_map_to_users_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
        s.user_add(&user("bob")).unwrap();
        s.terminal_add(&[9; 32], "t1", "bob", &[0]).unwrap();
        let t = s.terminal_get(&[9; 32]).unwrap().unwrap();
        assert_eq!(t.user_id, "bob");
        assert!(!t.revoked);
        assert!(s.terminal_revoke("t1").unwrap());
        assert!(s.terminal_get(&[9; 32]).unwrap().unwrap().revoked);
        assert!(s.user_add(&user("bob")).is_err());
    }

    #[test]
    fn revoking_or_removing_logs_each_terminal_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
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
}
