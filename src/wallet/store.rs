//! What a ledger back end provides: the SQL of one database, nothing more.
//! The writer logic (checks, chaining, mail text, audit) is written once in
//! `apply.rs` against this trait; [`crate::wallet::sqlite::SqliteStore`]
//! and [`crate::wallet::pg::PgStore`] implement it.
//!
//! ```text
//! Writer<S: Store> ── begin_write (takes the ledger's write lock) ── head ── reads/writes ── commit
//! GroupLedger<S>   ── a second S for balance / history
//! ```

use super::{Amount, Currency, Decision, Entry, EntryKind, WalletError, WalletResult};

/// An entry as the database returns it, before its fields are checked.
pub struct EntryRow {
    pub seq: i64,
    pub user: String,
    pub kind: String,
    pub decision_id: String,
    pub amount: i64,
    pub currency: String,
    pub balance_after: i64,
    pub market: String,
    pub order_ref: String,
    pub idempotency_key: String,
    pub voucher_id: String,
    pub created_ms: i64,
    pub prev_mac: Vec<u8>,
    pub mac: Vec<u8>,
}

/// The stored columns of an entry, in [`EntryRow`]'s order.
pub const ENTRY_COLUMNS: &str = "seq, \"user\", kind, decision_id, amount, currency, \
     balance_after, market, order_ref, idempotency_key, voucher_id, created_ms, prev_mac, mac";

impl EntryRow {
    /// The entry, or a description of a row that cannot be one.
    pub fn into_entry(self) -> Result<Entry, String> {
        let seq = self.seq;
        let Some(kind) = EntryKind::parse(&self.kind) else {
            return Err(format!("entry {seq}: unknown kind {:?}", self.kind));
        };
        let Ok(currency) = Currency::new(&self.currency) else {
            return Err(format!("entry {seq}: bad currency {:?}", self.currency));
        };
        let (Ok(prev_mac), Ok(mac)) = (
            self.prev_mac.as_slice().try_into(),
            self.mac.as_slice().try_into(),
        ) else {
            return Err(format!("entry {seq}: MAC is not 32 bytes"));
        };
        Ok(Entry {
            seq,
            user: self.user,
            kind,
            decision_id: self.decision_id,
            amount: Amount {
                minor: self.amount,
                currency,
            },
            balance_after: self.balance_after,
            market: self.market,
            order_ref: self.order_ref,
            idempotency_key: self.idempotency_key,
            voucher_id: self.voucher_id,
            created_ms: self.created_ms,
            prev_mac,
            mac,
        })
    }
}

/// A purchase decision as looked up by a cancel.
pub struct DecisionRow {
    pub user: String,
    pub market: String,
    pub amount: i64,
    pub currency: String,
    pub order_ref: String,
    pub state: String,
}

/// A decision found by its idempotency key (the user is the key's).
pub struct KeyedDecision {
    pub id: String,
    pub seq: i64,
    pub market: String,
    pub amount: i64,
    pub currency: String,
    pub order_ref: String,
    pub balance_after: i64,
    pub created_ms: i64,
    pub cancelled: bool,
}

impl KeyedDecision {
    /// The first result of a retried purchase. A cancelled decision has no
    /// result to repeat: answering it would have the broker sign a fresh
    /// receipt for money already refunded.
    pub fn into_decision(self, user: &str) -> WalletResult<Decision> {
        if self.cancelled {
            return Err(WalletError::AlreadyCancelled);
        }
        let currency = Currency::new(&self.currency)
            .map_err(|_| WalletError::storage(format!("decision {}: bad currency", self.id)))?;
        Ok(Decision {
            id: self.id,
            seq: self.seq,
            user: user.into(),
            market: self.market,
            amount: Amount {
                minor: self.amount,
                currency,
            },
            order_ref: self.order_ref,
            balance_after: self.balance_after,
            created_ms: self.created_ms,
        })
    }
}

/// An outbox row to write.
pub struct NewMail<'a> {
    pub message_id: &'a str,
    pub user: &'a str,
    pub to: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub now: i64,
}

/// What [`Store::scan`] reports: every entry in seq order, then every
/// account row (user, currency, stored balance).
pub enum Scanned {
    Entry(Result<Entry, String>),
    Account(String, String, i64),
}

/// The storage of one ledger. Write methods run between
/// [`Store::begin_write`] and [`Store::commit`] / [`Store::rollback`].
pub trait Store: Send + 'static {
    /// Starts the group's transaction holding the ledger-wide write lock:
    /// another writer on the same database waits until this one commits.
    fn begin_write(&mut self) -> WalletResult<()>;
    fn commit(&mut self) -> WalletResult<()>;
    fn rollback(&mut self) -> WalletResult<()>;
    /// The last entry's seq and MAC.
    fn head(&mut self) -> WalletResult<Option<(i64, Vec<u8>)>>;
    /// The MAC of entry `seq`, if there is one.
    fn mac_at(&mut self, seq: i64) -> WalletResult<Option<Vec<u8>>>;
    fn balance_of(&mut self, user: &str, currency: &str) -> WalletResult<i64>;
    fn set_balance(&mut self, user: &str, currency: &str, balance: i64) -> WalletResult<()>;
    fn insert_entry(&mut self, e: &Entry) -> WalletResult<()>;
    fn queue_mail(&mut self, m: &NewMail<'_>) -> WalletResult<()>;
    /// The mailer's marks on outbox rows, applied by the writer.
    fn outbox_update(&mut self, u: &super::mailer::OutboxUpdate) -> WalletResult<()>;
    fn decision_by_key(&mut self, user: &str, key: &str) -> WalletResult<Option<KeyedDecision>>;
    fn decision_by_id(&mut self, id: &str) -> WalletResult<Option<DecisionRow>>;
    fn insert_decision(&mut self, d: &Decision, idempotency_key: &str) -> WalletResult<()>;
    fn mark_cancelled(&mut self, id: &str) -> WalletResult<()>;
    fn voucher_used(&mut self, voucher_id: &str) -> WalletResult<bool>;
    fn insert_voucher(&mut self, voucher_id: &str, seq: i64) -> WalletResult<()>;
    /// Every entry in seq order, then every account, from one snapshot.
    fn scan(&mut self, sink: &mut dyn FnMut(Scanned) -> WalletResult<()>) -> WalletResult<()>;
    /// `user`'s non-zero balances by currency code, sorted.
    fn balances(&mut self, user: &str) -> WalletResult<Vec<(String, i64)>>;
    /// `user`'s entries, oldest first.
    fn history(&mut self, user: &str) -> WalletResult<Vec<Result<Entry, String>>>;
}
