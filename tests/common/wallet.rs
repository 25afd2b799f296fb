//! Ledger test helpers shared by tests/wallet.rs and tests/wallet_pg.rs,
//! for any back end (`&dyn Ledger`).

use keybroker::wallet::{Amount, CancelRequest, Ledger, PurchaseRequest, TopUpRequest};
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
