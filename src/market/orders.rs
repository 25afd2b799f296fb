//! The reference market's durable order book: one row per purchase
//! decision it accepted a receipt for, keyed by decision id.
//!
//! ```text
//! RECEIPT (verified) ─► accepted{deliver_at = now + delivery_delay} ─┬─ now ≥ deliver_at ─► delivered
//!                                                                    └─ CANCEL before then ─► cancelled
//! a second RECEIPT for the id: refused (whatever its bytes: ECDSA signatures are malleable)
//! CANCEL for an unknown, another user's or a delivered id: refused (no signing oracle)
//! ```
//!
//! SQLite in WAL mode with `synchronous=FULL`, so a receipt the market has
//! answered `RECEIPT OK` survives a crash and is never accepted twice.
//! The reference market writes it on the core thread that serves the
//! request: receipts and cancels are rare beside exchanges, and a
//! production market keeps its orders its own way.

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    decision_id       TEXT PRIMARY KEY,
    user              TEXT NOT NULL,
    amount_minor      INTEGER NOT NULL,
    currency          TEXT NOT NULL,
    order_ref         TEXT NOT NULL,
    created_ms        INTEGER NOT NULL,
    accepted_ms       INTEGER NOT NULL,
    deliver_at_ms     INTEGER NOT NULL,
    cancelled_ms      INTEGER,
    cancel_nonce      BLOB,
    cancel_expiry_ms  INTEGER
);
";

/// What the market accepted: the fields of a verified receipt it records.
pub struct NewOrder<'a> {
    pub decision_id: &'a str,
    pub user: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub order_ref: &'a str,
    pub created_ms: i64,
}

pub struct Orders(Connection);

/// Why an order operation was refused: the text after `REFUSED `.
pub type Refused = &'static str;

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Orders {
    pub fn open(path: &Path) -> Result<Self> {
        let c = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        Self::with(c)
    }

    /// An order book that lives as long as the process (library use and
    /// unit tests; `market serve` always opens a file).
    pub fn in_memory() -> Result<Self> {
        Self::with(Connection::open_in_memory()?)
    }

    fn with(c: Connection) -> Result<Self> {
        c.execute_batch(SCHEMA)?;
        Ok(Self(c))
    }

    /// Records a verified receipt, once per decision id.
    pub fn accept(&self, o: &NewOrder, now: u64, deliver_at: u64) -> Result<(), Refused> {
        let inserted = self
            .0
            .prepare_cached(
                "INSERT INTO orders (decision_id, user, amount_minor, currency, order_ref,
                     created_ms, accepted_ms, deliver_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (decision_id) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    o.decision_id,
                    o.user,
                    o.amount_minor,
                    o.currency,
                    o.order_ref,
                    o.created_ms,
                    ms(now),
                    ms(deliver_at)
                ])
            })
            .map_err(|e| store_failed(&e))?;
        if inserted == 1 {
            return Ok(());
        }
        match self.state(o.decision_id)? {
            Some(s) if s.cancelled => Err("cancelled"),
            _ => Err("already presented"),
        }
    }

    /// Marks `decision_id` of `user` cancelled, if it is not delivered by
    /// `now`, under an authorisation with `nonce` until `expiry`. A decision
    /// cancelled already may be authorised again (the terminal may have
    /// lost the answer; the broker refunds once whatever it is shown).
    pub fn cancel(
        &self,
        decision_id: &str,
        user: &str,
        now: u64,
        nonce: &[u8; 16],
        expiry: u64,
    ) -> Result<(), Refused> {
        match self.state(decision_id)? {
            Some(s) if s.user == user && (s.cancelled || now < s.deliver_at) => {}
            Some(s) if s.user == user => return Err("delivered"),
            _ => return Err("unknown decision"),
        }
        self.0
            .prepare_cached(
                "UPDATE orders SET cancelled_ms = COALESCE(cancelled_ms, ?2),
                     cancel_nonce = ?3, cancel_expiry_ms = ?4 WHERE decision_id = ?1",
            )
            .and_then(|mut s| s.execute(params![decision_id, ms(now), &nonce[..], ms(expiry)]))
            .map_err(|e| store_failed(&e))?;
        Ok(())
    }

    fn state(&self, decision_id: &str) -> Result<Option<State>, Refused> {
        self.0
            .prepare_cached(
                "SELECT user, deliver_at_ms, cancelled_ms IS NOT NULL FROM orders WHERE decision_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([decision_id], |r| {
                    Ok(State {
                        user: r.get(0)?,
                        deliver_at: r.get::<_, i64>(1)?.max(0) as u64,
                        cancelled: r.get(2)?,
                    })
                })
                .optional()
            })
            .map_err(|e| store_failed(&e))
    }
}

struct State {
    user: String,
    deliver_at: u64,
    cancelled: bool,
}

fn store_failed(e: &rusqlite::Error) -> Refused {
    tracing::error!(error = %e, "market order store failed");
    "market store unavailable"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str) -> NewOrder<'_> {
        NewOrder {
            decision_id: id,
            user: "alice",
            amount_minor: 100,
            currency: "EUR",
            order_ref: "o",
            created_ms: 0,
        }
    }

    #[test]
    fn a_receipt_is_accepted_once_and_a_cancel_only_before_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let o = Orders::open(&dir.path().join("orders.db")).unwrap();
        assert_eq!(
            o.cancel("d1", "alice", 0, &[1; 16], 10),
            Err("unknown decision")
        );
        o.accept(&order("d1"), 0, 1_000).unwrap();
        assert_eq!(o.accept(&order("d1"), 1, 1_001), Err("already presented"));
        assert_eq!(
            o.cancel("d1", "bob", 10, &[1; 16], 20),
            Err("unknown decision")
        );
        o.cancel("d1", "alice", 10, &[1; 16], 20).unwrap();
        // Again (a lost answer), even past the delivery time: never delivered.
        o.cancel("d1", "alice", 2_000, &[2; 16], 2_100).unwrap();
        assert_eq!(o.accept(&order("d1"), 2_000, 3_000), Err("cancelled"));
        o.accept(&order("d2"), 0, 1_000).unwrap();
        assert_eq!(
            o.cancel("d2", "alice", 1_000, &[3; 16], 1_100),
            Err("delivered")
        );
        // Durable: a reopened file remembers.
        drop(o);
        let o = Orders::open(&dir.path().join("orders.db")).unwrap();
        assert_eq!(o.accept(&order("d2"), 5, 6), Err("already presented"));
        assert_eq!(o.accept(&order("d1"), 5, 6), Err("cancelled"));
    }
}
