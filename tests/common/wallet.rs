//! Ledger test helpers shared by tests/wallet.rs and tests/wallet_pg.rs,
//! for any back end (`&dyn Ledger`).

use keybroker::wallet::{
    Amount, CancelRequest, Decision, Ledger, MAX_AMOUNT, PurchaseRequest, TopUpRequest, WalletError,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub fn eur(minor: i64) -> Amount {
    Amount::new(minor, "EUR").unwrap()
}

pub fn mail(user: &str) -> String {
    format!("{user}@example.org")
}

static VOUCHERS: AtomicU64 = AtomicU64::new(0);

/// Credits `user` with a fresh voucher id.
pub fn fund(l: &dyn Ledger, user: &str, amount: Amount) {
    let id = format!(
        "test-{}-{}",
        std::process::id(),
        VOUCHERS.fetch_add(1, Ordering::Relaxed)
    );
    l.top_up(TopUpRequest {
        user: user.into(),
        amount,
        voucher_id: id,
        mail_to: mail(user),
    })
    .expect("top up");
}

pub fn buy(user: &str, minor: i64, key: &str) -> PurchaseRequest {
    PurchaseRequest {
        user: user.into(),
        market: "m1".into(),
        amount: eur(minor),
        order_ref: format!("order {key}"),
        idempotency_key: key.into(),
        mail_to: mail(user),
    }
}

pub fn cancel(user: &str, d: &str) -> CancelRequest {
    CancelRequest {
        user: user.into(),
        decision_id: d.into(),
        mail_to: mail(user),
        market: None,
    }
}

/// `user`'s EUR balance.
pub fn balance(l: &dyn Ledger, user: &str) -> i64 {
    l.balance(user)
        .unwrap()
        .iter()
        .find(|a| a.currency.as_str() == "EUR")
        .map_or(0, |a| a.minor)
}

pub fn assert_audit_ok(l: &dyn Ledger) {
    let r = l.audit().unwrap();
    assert!(r.ok, "audit: {:?}", r.problems);
}

/// No executor here: polls until the writer answers.
pub fn block_on<T>(mut rx: futures_channel::oneshot::Receiver<T>) -> T {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(Some(v)) => return v,
            Ok(None) => std::thread::sleep(Duration::from_micros(200)),
            Err(_) => panic!("ledger writer dropped the answer"),
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no answer");
    }
}

/// Retries with one idempotency key return the first decision and debit
/// once, also when submitted together into one group; the same key of
/// another user is another purchase. Returns the first decision, for the
/// caller's back-end-specific outbox check.
pub fn check_idempotent_retries(l: &dyn Ledger) -> Decision {
    fund(l, "bob", eur(1_000));
    let first = l.purchase(buy("bob", 300, "retry-1")).unwrap();
    for _ in 0..3 {
        assert_eq!(l.purchase(buy("bob", 300, "retry-1")).unwrap(), first);
    }
    // A retry with other fields still returns the first decision.
    assert_eq!(l.purchase(buy("bob", 999, "retry-1")).unwrap(), first);
    assert_eq!(balance(l, "bob"), 700);
    // Submitted together: they land in one group and still debit once.
    let pending: Vec<_> = (0..32)
        .map(|_| l.purchase_async(buy("bob", 200, "retry-2")))
        .collect();
    let decisions: Vec<Decision> = pending.into_iter().map(|p| block_on(p).unwrap()).collect();
    assert!(decisions.iter().all(|d| d == &decisions[0]));
    assert_eq!(balance(l, "bob"), 500);
    assert_eq!(decisions[0].balance_after, 500);
    fund(l, "carol", eur(1_000));
    assert_ne!(
        l.purchase(buy("carol", 200, "retry-2")).unwrap().id,
        decisions[0].id
    );
    assert_eq!(l.history("bob").unwrap().len(), 3);
    assert_audit_ok(l);
    first
}

/// Cancel rules every ledger keeps: only the owner, a known decision, with
/// the market that made it, once; the idempotency key still names the
/// cancelled decision, so its retry is refused and debits nothing (no
/// receipt for refunded money). Leaves dave at 1,000 with one cancelled
/// decision.
pub fn check_cancel_rules(l: &dyn Ledger) -> Decision {
    fund(l, "dave", eur(1_000));
    let d = l.purchase(buy("dave", 400, "c1")).unwrap();
    assert_eq!(balance(l, "dave"), 600);
    assert_eq!(
        l.cancel(cancel("erin", &d.id)).unwrap_err(),
        WalletError::NotYourDecision
    );
    assert_eq!(
        l.cancel(cancel("dave", "00ff")).unwrap_err(),
        WalletError::UnknownDecision
    );
    let mut wrong_market = cancel("dave", &d.id);
    wrong_market.market = Some("m2".into());
    assert_eq!(
        l.cancel(wrong_market).unwrap_err(),
        WalletError::BadAuthorisation
    );
    let e = l.cancel(cancel("dave", &d.id)).unwrap();
    assert_eq!((e.amount, e.balance_after), (eur(400), 1_000));
    assert_eq!(
        l.cancel(cancel("dave", &d.id)).unwrap_err(),
        WalletError::AlreadyCancelled
    );
    assert_eq!(
        l.purchase(buy("dave", 400, "c1")).unwrap_err(),
        WalletError::AlreadyCancelled
    );
    assert_eq!(balance(l, "dave"), 1_000);
    d
}

/// Zero, negative, too large and uncovered amounts, unknown currencies and
/// malformed fields are typed errors and change nothing; a refused retry
/// key is not consumed.
pub fn check_bad_input(l: &dyn Ledger) {
    fund(l, "gina", eur(1_000));
    let before = l.history("gina").unwrap();
    for (minor, err) in [
        (0, WalletError::InvalidAmount),
        (-5, WalletError::InvalidAmount),
        (i64::MIN, WalletError::InvalidAmount),
        (MAX_AMOUNT + 1, WalletError::InvalidAmount),
        (2_000, WalletError::InsufficientFunds),
    ] {
        assert_eq!(
            l.purchase(buy("gina", minor, &format!("b{minor}")))
                .unwrap_err(),
            err
        );
        if minor != 2_000 {
            let top = TopUpRequest {
                user: "gina".into(),
                amount: eur(minor),
                voucher_id: format!("v{minor}"),
                mail_to: mail("gina"),
            };
            assert_eq!(l.top_up(top).unwrap_err(), err);
        }
    }
    let mut p = buy("gina", 10, "xxx");
    p.amount = Amount::new(10, "XXX").unwrap();
    assert_eq!(l.purchase(p).unwrap_err(), WalletError::UnknownCurrency);
    assert_eq!(
        Amount::new(10, "eur").unwrap_err(),
        WalletError::UnknownCurrency
    );
    let bad: [fn(&mut PurchaseRequest); 4] = [
        |p| p.order_ref = "x\r\nBcc: victim@example.org".into(),
        |p| p.mail_to = "not a mail".into(),
        |p| p.user = "gina'; DROP TABLE entries; --".into(),
        |p| p.idempotency_key = String::new(),
    ];
    for (i, spoil) in bad.iter().enumerate() {
        let mut p = buy("gina", 10, &format!("bad{i}"));
        spoil(&mut p);
        assert!(matches!(
            l.purchase(p).unwrap_err(),
            WalletError::InvalidInput(_)
        ));
    }
    assert_eq!(l.history("gina").unwrap(), before);
    assert_eq!(balance(l, "gina"), 1_000);
    l.purchase(buy("gina", 1_000, "b2000")).unwrap();
    assert_eq!(balance(l, "gina"), 0);
    assert_audit_ok(l);
}

// ---- anchors ----

use keybroker::wallet::anchor::{Anchor, AnchorConfig};
use keybroker::wallet::{AuditReport, LedgerConfig, Restored};
use std::path::Path;

/// The tests' anchor interval: short, so that tests wait little.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// A ledger configuration whose writer anchors into `path`.
pub fn anchored(path: &Path) -> LedgerConfig {
    let mut a = AnchorConfig::new(path.to_path_buf());
    a.interval = INTERVAL;
    LedgerConfig {
        anchor: Some(a),
        ..LedgerConfig::default()
    }
}

/// Every record of an anchor file, in order (lines that are no record
/// left out; MACs not checked: the audit does that).
pub fn anchors_in(path: &Path) -> Vec<Anchor> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Anchor::parse(l).ok())
        .collect()
}

/// The highest seq anchored in `path` (0 if none).
pub fn anchored_seq(path: &Path) -> i64 {
    anchors_in(path)
        .iter()
        .filter_map(|a| a.head(0))
        .map(|h| h.seq)
        .max()
        .unwrap_or(0)
}

/// Waits until `path` anchors `seq`, which takes at most the interval.
pub fn wait_anchored(path: &Path, seq: i64) {
    let start = Instant::now();
    while anchored_seq(path) < seq {
        assert!(
            start.elapsed() < INTERVAL * 20,
            "entry {seq} not anchored in {}: {:?}",
            path.display(),
            std::fs::read_to_string(path)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Entries 1..=5: a top-up, three purchases and the cancel of the last,
/// all anchored. Returns the balance after entry 3.
pub fn five_anchored_entries(l: &dyn Ledger, anchors: &Path, user: &str) -> i64 {
    fund(l, user, eur(1_000));
    l.purchase(buy(user, 100, "a1")).unwrap();
    let after_3 = l.purchase(buy(user, 200, "a2")).unwrap().balance_after;
    let d = l.purchase(buy(user, 300, "a3")).unwrap();
    l.cancel(cancel(user, &d.id)).unwrap();
    wait_anchored(anchors, 5);
    assert_audit_ok(l);
    after_3
}

/// Entries 6..=8 after [`five_anchored_entries`], anchored.
pub fn three_more_anchored(l: &dyn Ledger, anchors: &Path, user: &str) {
    for i in 0..3 {
        l.purchase(buy(user, 10, &format!("later-{i}"))).unwrap();
    }
    wait_anchored(anchors, 8);
}

/// The audit failed, naming the gap between the ledger's last entry and
/// the anchored one.
pub fn assert_gap(r: &AuditReport, ends_at: i64, anchored: i64) {
    assert!(!r.ok, "the audit passed: {r:?}");
    let gap = format!("the ledger ends at entry {ends_at}, but entry {anchored} was anchored at");
    let missing = format!("entries {}..={anchored} are missing", ends_at + 1);
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains(&gap) && p.contains(&missing)),
        "{:?}",
        r.problems
    );
}

/// An honest restore: the chain verifies, the record pins `head`, the
/// audit passes afterwards, and purchases append again.
pub fn assert_honest_restore(l: &dyn Ledger, user: &str, head: i64, superseded: i64) -> Restored {
    let r = l.restore("put back the backup of 10:00").unwrap();
    assert!(r.audit.ok, "{:?}", r.audit.problems);
    let record = r.record.as_ref().expect("a restore record");
    assert_eq!(record.head(0).unwrap().seq, head);
    assert_eq!(
        r.superseded.as_ref().and_then(|s| s.head(0)).map(|h| h.seq),
        Some(superseded)
    );
    assert_audit_ok(l);
    let d = l.purchase(buy(user, 1, "after-restore")).unwrap();
    assert_eq!(d.seq, head + 1);
    assert_audit_ok(l);
    r
}
