//! The home-card wallet: e-money balances, purchases, cancellations and
//! top-ups, in an append-only ledger chained with an HSM-held HMAC key.
//!
//! ```text
//! broker core ──purchase/cancel/top_up──► bounded queue ──► writer thread (one)
//!                                                             │ group of ≤ 512 requests
//!                                                             │ ONE transaction, ONE fsync
//!                                                             │ entries chained: mac = HMAC(prev_mac ‖ entry)
//!                                                             ▼
//!                                     ledger.db (SQLite WAL, synchronous=FULL)
//!                                     accounts · entries · decisions · vouchers_used · outbox
//!                                                             │
//!                          mailer thread ◄── pending outbox rows ── SMTP relay or Maildir
//! ```
//!
//! Why one writer: SQLite serialises writers anyway, and one thread that
//! takes everything queued and commits it at once pays one fsync per group
//! instead of one per purchase. Why money as `i64` minor units: floats lose
//! cents. Why the mail is queued in the same transaction: a debit without
//! its notification (or the reverse) cannot be committed.
//!
//! Modules: [`ledger`] (the writer and reads), [`chain`] (the HMAC chain),
//! [`anchor`] (the chain's head, MAC'd and kept outside the database),
//! [`voucher`] (signed top-up vouchers), [`cancel`] (market-signed
//! cancellation authorisations), [`mailer`] (the outbox drain).

pub mod anchor;
mod apply;
pub mod chain;
pub mod ledger;
pub mod mailer;
pub mod pg;
pub mod pg_cluster;
mod schema;
mod smtp;
pub mod sqlite;
pub mod store;
pub mod voucher;

pub use chain::{ChainMac, HsmChainMac, SoftChainMac};
pub use ledger::{GroupLedger, LedgerConfig, SqliteLedger};
pub use pg::{PgConnect, PgLedger};

use futures_channel::oneshot;
use std::fmt;
use thiserror::Error;

/// Largest amount of one operation, in minor units (10^12: ten billion EUR).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Currencies accepted by default, with their number of minor-unit digits.
pub const DEFAULT_CURRENCIES: [(&str, u32); 5] =
    [("EUR", 2), ("USD", 2), ("GBP", 2), ("JPY", 0), ("CHF", 2)];

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WalletError {
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("unknown currency")]
    UnknownCurrency,
    #[error("invalid amount: must be > 0 and <= {MAX_AMOUNT} minor units")]
    InvalidAmount,
    #[error("arithmetic overflow")]
    Overflow,
    #[error("unknown decision")]
    UnknownDecision,
    #[error("decision belongs to another user")]
    NotYourDecision,
    #[error("decision already cancelled")]
    AlreadyCancelled,
    #[error("voucher already used")]
    VoucherUsed,
    #[error("bad voucher: {0}")]
    BadVoucher(&'static str),
    #[error("bad cancellation authorisation")]
    BadAuthorisation,
    #[error("invalid input: {0}")]
    InvalidInput(&'static str),
    #[error("ledger queue full")]
    Busy,
    /// The database failed; nothing of the operation was acknowledged.
    #[error("ledger storage: {0}")]
    Storage(#[source] Cause),
    /// The HSM's chain MAC failed.
    #[error("ledger MAC: {0}")]
    Mac(#[source] Cause),
}

impl WalletError {
    /// A storage failure with no error below it.
    pub fn storage(what: impl Into<String>) -> Self {
        WalletError::Storage(Cause::new(what))
    }

    /// A MAC failure with no error below it.
    pub fn mac(what: impl Into<String>) -> Self {
        WalletError::Mac(Cause::new(what))
    }

    /// Whether the same request may succeed later: a full queue, a locked
    /// or unreachable database, an HSM that may come back. Refusals
    /// (funds, vouchers, decisions, input) are final. A retry is safe in
    /// every case: purchases carry their idempotency key, top-ups their
    /// voucher, and a cancel is refused once done.
    pub fn retryable(&self) -> bool {
        match self {
            WalletError::Busy => true,
            WalletError::Storage(c) | WalletError::Mac(c) => c.retryable,
            _ => false,
        }
    }
}

/// What went wrong below the ledger, with the error that said so (kept as
/// the `source`, shared so the error can go to every request of a group)
/// and whether trying again can help.
#[derive(Clone, Debug)]
pub struct Cause {
    what: String,
    retryable: bool,
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            retryable: false,
            source: None,
        }
    }

    /// `what` caused by `source`.
    pub fn of(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
        retryable: bool,
    ) -> Self {
        Self {
            what: what.into(),
            retryable,
            source: Some(std::sync::Arc::new(source)),
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Two causes are the same failure if they say the same and agree on a
/// retry; the error objects below them are not comparable.
impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        self.what == other.what && self.retryable == other.retryable
    }
}

impl Eq for Cause {}

impl From<rusqlite::Error> for WalletError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
        // Another connection holds the lock: the same write may pass later.
        let retryable = matches!(e.sqlite_error_code(), Some(DatabaseBusy | DatabaseLocked));
        WalletError::Storage(Cause::of(e.to_string(), e, retryable))
    }
}

impl From<postgres::Error> for WalletError {
    fn from(e: postgres::Error) -> Self {
        use postgres::error::SqlState;
        // `Display` of a server error is only "db error"; the detail is in
        // the source. Neither carries the password.
        let (detail, retryable) = match e.as_db_error() {
            Some(d) => (
                format!("{}: {}", d.code().code(), d.message()),
                // A transaction that lost a race, or a server going down.
                [
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(d.code()),
            ),
            // No answer from the server: the connection is gone.
            None => {
                let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
                (e.to_string(), e.is_closed() || io)
            }
        };
        WalletError::Storage(Cause::of(detail, e, retryable))
    }
}

pub type WalletResult<T> = Result<T, WalletError>;

/// An ISO 4217-style code: three ASCII capital letters. Whether the ledger
/// accepts it is [`LedgerConfig::currencies`]' business.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn new(code: &str) -> WalletResult<Self> {
        match code.as_bytes() {
            &[a, b, c] if [a, b, c].iter().all(u8::is_ascii_uppercase) => Ok(Self([a, b, c])),
            _ => Err(WalletError::UnknownCurrency),
        }
    }
    pub fn as_str(&self) -> &str {
        // Only ASCII capitals are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
    pub fn bytes(&self) -> [u8; 3] {
        self.0
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Money: integer minor units (cents, yen) and a currency. Never a float.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Amount {
    pub minor: i64,
    pub currency: Currency,
}

impl Amount {
    /// `Amount::new(1250, "EUR")` is 12.50 EUR. Checks only the code's form.
    pub fn new(minor: i64, currency: &str) -> WalletResult<Self> {
        Ok(Self {
            minor,
            currency: Currency::new(currency)?,
        })
    }
}

impl fmt::Display for Amount {
    /// `12.50 EUR`, `300 JPY`; unknown codes print minor units.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = DEFAULT_CURRENCIES
            .iter()
            .find(|(c, _)| *c == self.currency.as_str())
            .map_or(0, |(_, d)| *d);
        if digits == 0 {
            return write!(f, "{} {}", self.minor, self.currency);
        }
        let scale = 10i64.pow(digits);
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        let scale_u = scale.unsigned_abs();
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            abs / scale_u,
            abs % scale_u,
            self.currency,
            width = digits as usize
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Purchase,
    Cancel,
    TopUp,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Purchase => "purchase",
            EntryKind::Cancel => "cancel",
            EntryKind::TopUp => "topup",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "purchase" => Some(EntryKind::Purchase),
            "cancel" => Some(EntryKind::Cancel),
            "topup" => Some(EntryKind::TopUp),
            _ => None,
        }
    }
}

/// A purchase decision: the receipt of a debit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// 16 random bytes, hex.
    pub id: String,
    /// The ledger entry that debited.
    pub seq: i64,
    pub user: String,
    pub market: String,
    pub amount: Amount,
    pub order_ref: String,
    pub balance_after: i64,
    pub created_ms: i64,
}

/// One ledger entry, as stored. `amount` is always positive; the kind
/// says whether it debited (purchase) or credited (cancel, top-up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: i64,
    pub user: String,
    pub kind: EntryKind,
    pub decision_id: String,
    pub amount: Amount,
    pub balance_after: i64,
    pub market: String,
    pub order_ref: String,
    pub idempotency_key: String,
    pub voucher_id: String,
    pub created_ms: i64,
    pub prev_mac: [u8; 32],
    pub mac: [u8; 32],
}

/// What `audit` found: `ok` only if the chain verifies, every balance
/// recomputed from the entries equals the stored one, and the ledger holds
/// every head anchored outside it (docs/OPERATIONS.md, "Ledger anchors").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditReport {
    pub entries: u64,
    pub ok: bool,
    pub problems: Vec<String>,
    /// Anchor records whose MAC verified, over every source.
    pub anchors: u64,
    /// Findings that are no failure: superseded records, torn lines, a
    /// tail not anchored yet.
    pub notes: Vec<String>,
}

/// What `keybroker restore` did: the restored chain's own audit (anchors
/// aside), and, only if that passed, the restore record it appended.
#[derive(Clone, Debug)]
pub struct Restored {
    pub audit: AuditReport,
    pub record: Option<anchor::Anchor>,
    /// The newest record before it, which it supersedes.
    pub superseded: Option<anchor::Anchor>,
}

#[derive(Clone, Debug)]
pub struct PurchaseRequest {
    pub user: String,
    pub market: String,
    pub amount: Amount,
    pub order_ref: String,
    /// Client-chosen; a retry with the same key returns the first decision.
    pub idempotency_key: String,
    pub mail_to: String,
}

#[derive(Clone, Debug)]
pub struct CancelRequest {
    pub user: String,
    pub decision_id: String,
    pub mail_to: String,
    /// The market whose authorisation the caller verified; it must be the
    /// decision's market (`BadAuthorisation` otherwise).
    pub market: Option<String>,
}

#[derive(Clone, Debug)]
pub struct TopUpRequest {
    pub user: String,
    pub amount: Amount,
    /// Hex of the voucher's 16-byte id; each id credits once.
    pub voucher_id: String,
    pub mail_to: String,
}

impl TopUpRequest {
    /// The top-up a verified voucher pays for.
    pub fn from_voucher(v: &voucher::Voucher, mail_to: &str) -> Self {
        Self {
            user: v.user.clone(),
            amount: v.amount,
            voucher_id: hex::encode(v.id),
            mail_to: mail_to.into(),
        }
    }
}

/// An answer that arrives later; `Err(Canceled)` means the writer is gone.
pub type Pending<T> = oneshot::Receiver<WalletResult<T>>;

/// The ledger interface. [`SqliteLedger`] is the embedded implementation,
/// [`PgLedger`] the shared one (several broker nodes on one PostgreSQL
/// database); both are a [`GroupLedger`] over a [`store::Store`], so the
/// checks, the chain and the audit are the same code.
pub trait Ledger: Send + Sync {
    /// Queues a purchase; a full queue answers `Busy` at once.
    fn purchase_async(&self, req: PurchaseRequest) -> Pending<Decision>;
    fn cancel_async(&self, req: CancelRequest) -> Pending<Entry>;
    fn top_up_async(&self, req: TopUpRequest) -> Pending<Entry>;
    fn purchase(&self, req: PurchaseRequest) -> WalletResult<Decision>;
    fn cancel(&self, req: CancelRequest) -> WalletResult<Entry>;
    fn top_up(&self, req: TopUpRequest) -> WalletResult<Entry>;
    /// Every non-zero balance of `user`, by currency.
    fn balance(&self, user: &str) -> WalletResult<Vec<Amount>>;
    /// `user`'s entries, oldest first.
    fn history(&self, user: &str) -> WalletResult<Vec<Entry>>;
    /// Re-verifies the whole chain and every balance, and checks the
    /// ledger against its anchors.
    fn audit(&self) -> WalletResult<AuditReport>;
    /// After a backup was put back: verifies the chain as it is, and
    /// records a restore anchor with `reason` that makes the audit accept
    /// its head. Refused without an anchor file open for writing.
    fn restore(&self, reason: &str) -> WalletResult<Restored>;
    /// Why the writer refused, when it started, to append to this ledger
    /// (behind its anchors, or anchors missing); `None` if it appends.
    fn refusing(&self) -> Option<String>;
}

/// The host's clock in ms, for callers outside the ledger (vouchers,
/// backups); the ledger reads its own [`ledger::LedgerConfig::clock`].
pub fn now_ms() -> i64 {
    use crate::clock::Clock;
    crate::clock::SystemClock.now_ms()
}

/// A user or market id (`syntax::is_id`).
pub(crate) fn check_id(what: &'static str, s: &str) -> WalletResult<()> {
    if crate::syntax::is_id(s) {
        Ok(())
    } else {
        Err(WalletError::InvalidInput(what))
    }
}

/// Free text that ends up in mail headers: printable ASCII, bounded.
pub(crate) fn check_text(
    what: &'static str,
    s: &str,
    max: usize,
    empty_ok: bool,
) -> WalletResult<()> {
    if crate::syntax::is_text(s, max, empty_ok) {
        Ok(())
    } else {
        Err(WalletError::InvalidInput(what))
    }
}

/// A mail address (`syntax::is_mail`).
pub(crate) fn check_mail(s: &str) -> WalletResult<()> {
    if crate::syntax::is_mail(s) {
        Ok(())
    } else {
        Err(WalletError::InvalidInput("mail address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_print_in_major_units() {
        assert_eq!(Amount::new(1250, "EUR").unwrap().to_string(), "12.50 EUR");
        assert_eq!(Amount::new(5, "USD").unwrap().to_string(), "0.05 USD");
        assert_eq!(Amount::new(300, "JPY").unwrap().to_string(), "300 JPY");
        assert_eq!(
            Amount::new(i64::MIN, "EUR").unwrap().to_string(),
            "-92233720368547758.08 EUR"
        );
    }

    #[test]
    fn currency_codes_are_three_capitals() {
        assert!(Currency::new("EUR").is_ok());
        for bad in ["eur", "EU", "EURO", "", "E1R", "ÉUR"] {
            assert_eq!(
                Currency::new(bad),
                Err(WalletError::UnknownCurrency),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_text_and_mail_are_bounded() {
        assert!(check_id("user", "alice.b-1_").is_ok());
        assert!(check_id("user", "").is_err());
        assert!(check_id("user", &"a".repeat(65)).is_err());
        assert!(check_id("user", "a b").is_err());
        assert!(check_text("ref", "order 17", 128, false).is_ok());
        assert!(check_text("ref", "x\r\nBcc: y", 128, false).is_err());
        assert!(check_mail("alice@example.org").is_ok());
        for bad in [
            "alice",
            "a@b",
            "a@@b.c",
            "a b@c.d",
            "a@c.d\r\nX: y",
            "<a@b.c>",
            "@b.c",
        ] {
            assert!(check_mail(bad).is_err(), "{bad}");
        }
    }

    /// A database another connection holds locked is worth a retry, and
    /// the SQLite error stays reachable as the source; a refusal is final.
    #[test]
    fn a_locked_database_is_retryable_and_keeps_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let a = rusqlite::Connection::open(&path).unwrap();
        a.execute_batch("CREATE TABLE t(x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        let b = rusqlite::Connection::open(&path).unwrap();
        b.busy_timeout(std::time::Duration::ZERO).unwrap();
        let e = WalletError::from(b.execute("INSERT INTO t VALUES (2)", []).unwrap_err());
        assert!(e.retryable(), "{e}");
        let cause = std::error::Error::source(&e).expect("the cause");
        let below = cause.source().expect("the SQLite error");
        assert!(below.is::<rusqlite::Error>());
        let e = WalletError::from(b.execute("INSERT INTO nowhere VALUES (2)", []).unwrap_err());
        assert!(!e.retryable(), "{e}");
        assert!(!WalletError::InsufficientFunds.retryable());
        assert!(WalletError::Busy.retryable());
    }
}
