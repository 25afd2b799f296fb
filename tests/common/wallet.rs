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
