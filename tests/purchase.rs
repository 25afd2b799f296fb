//! The home-card wallet through the broker: purchases with receipts the
//! market checks, cancels with the market's authorisation, top-ups with
//! vouchers; concurrency, bad input, and a SIGKILL under mixed load.
//! Real SoftHSM, real SQLite files, a real SMTP relay on loopback.

mod common;

use common::relay::{Relay, free_port};
use common::*;
use keybroker::cancel_auth::SignedCancel;
use keybroker::proto::ErrorCode;
use keybroker::terminal::{Direct, Terminal, TerminalConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn decision_of(receipt: &[u8]) -> String {
    keybroker::receipt::SignedReceipt::decode(receipt)
        .unwrap()
        .receipt
        .decision_id
}

fn direct(t: &mut Terminal) -> Direct {
    let b = t.exchange("m1").unwrap();
    Direct::connect(&b, TIMEOUT).unwrap()
}

#[test]
fn purchase_cancel_and_top_up_rules() {
    let (env, issuer) = wallet_env(None, "");
    let alice = env.user("alice");
    let bob = env.user("bob");
    let _m = env.market("m1", "*");
    let b = env.broker();
    let (_, p2) = pw("alice");

    // Not released yet: no purchase.
    let mut t = b.connect(&alice);
    t.login("alice", pw("alice").0.as_bytes()).unwrap();
    assert_eq!(
        refused(t.purchase("m1", 100, "EUR", "o", "k0")),
        ErrorCode::NotReleased
    );
    t.release(p2.as_bytes()).unwrap();

    // Top-up: voucher plus second password, once.
    let v = voucher(&env, &issuer, "alice", 10_000, "v1");
    assert_eq!(refused(t.top_up(&v, b"wrong")), ErrorCode::WrongPassword);
    assert_eq!(t.top_up(&v, p2.as_bytes()).unwrap(), 10_000);
    assert_eq!(refused(t.top_up(&v, p2.as_bytes())), ErrorCode::VoucherUsed);
    let for_bob = voucher(&env, &issuer, "bob", 500, "v2");
    assert_eq!(
        refused(t.top_up(&for_bob, p2.as_bytes())),
        ErrorCode::BadVoucher
    );
    let mut forged = voucher(&env, &issuer, "alice", 500, "v3");
    let n = forged.len();
    forged[n - 3] ^= 1;
    assert_eq!(
        refused(t.top_up(&forged, p2.as_bytes())),
        ErrorCode::BadVoucher
    );

    // Bad amounts and currencies change nothing.
    assert_eq!(
        refused(t.purchase("m1", 0, "EUR", "o", "k1")),
        ErrorCode::InvalidAmount
    );
    assert_eq!(
        refused(t.purchase("m1", -5, "EUR", "o", "k2")),
        ErrorCode::InvalidAmount
    );
    assert_eq!(
        refused(t.purchase("m1", i64::MAX, "EUR", "o", "k3")),
        ErrorCode::InvalidAmount
    );
    assert_eq!(
        refused(t.purchase("m1", 100, "XYZ", "o", "k4")),
        ErrorCode::UnknownCurrency
    );
    assert_eq!(
        refused(t.purchase("nowhere", 100, "EUR", "o", "k5")),
        ErrorCode::UnknownMarket
    );
    assert_eq!(
        refused(t.purchase("m1", 20_000, "EUR", "o", "k6")),
        ErrorCode::InsufficientFunds
    );
    assert_eq!(t.balance().unwrap(), vec![("EUR".to_owned(), 10_000)]);

    // A purchase, its receipt accepted by the market, an idempotent retry.
    let (after, receipt) = t.purchase("m1", 2_500, "EUR", "order 1", "k7").unwrap();
    assert_eq!(after, 7_500);
    let decision = decision_of(&receipt);
    let mut d = direct(&mut t);
    assert_eq!(d.present_receipt(&receipt).unwrap(), decision);
    let (again, receipt2) = t.purchase("m1", 2_500, "EUR", "order 1", "k7").unwrap();
    assert_eq!((again, decision_of(&receipt2)), (7_500, decision.clone()));
    assert_eq!(t.balance().unwrap(), vec![("EUR".to_owned(), 7_500)]);

    // A tampered receipt is refused by the market.
    let mut bad = receipt.clone();
    bad[40] ^= 1;
    assert!(d.present_receipt(&bad).is_err());

    // The market authorises no cancel for a decision it has not seen, nor
    // for another user's: bob gets nothing to show the broker.
    let mut tb = released(&b, &bob, "bob");
    let refusal = direct(&mut tb).cancel_authorisation(&decision).unwrap_err();
    assert!(
        refusal
            .to_string()
            .contains("CANCEL REFUSED unknown decision"),
        "{refusal}"
    );
    let refusal = d.cancel_authorisation("other-decision").unwrap_err();
    assert!(
        refusal
            .to_string()
            .contains("CANCEL REFUSED unknown decision"),
        "{refusal}"
    );
    // Alice's authorisation does not cancel for bob, nor for another id.
    let auth = d.cancel_authorisation(&decision).unwrap();
    assert_eq!(
        refused(tb.cancel(&decision, auth.clone())),
        ErrorCode::BadAuthorisation
    );
    assert_eq!(
        refused(t.cancel("other-decision", auth)),
        ErrorCode::BadAuthorisation
    );
    // A forged signature neither.
    let mut forged = SignedCancel::decode(&d.cancel_authorisation(&decision).unwrap()).unwrap();
    let last = forged.signature.len() - 1;
    forged.signature[last] ^= 1;
    assert_eq!(
        refused(t.cancel(&decision, forged.encode())),
        ErrorCode::BadAuthorisation
    );

    // The market's authorisation refunds exactly once.
    let auth = d.cancel_authorisation(&decision).unwrap();
    assert_eq!(t.cancel(&decision, auth.clone()).unwrap(), 10_000);
    assert_eq!(
        refused(t.cancel(&decision, auth)),
        ErrorCode::AlreadyCancelled
    );
    // A retry of the refunded purchase gets no receipt.
    assert_eq!(
        refused(t.purchase("m1", 2_500, "EUR", "order 1", "k7")),
        ErrorCode::AlreadyCancelled
    );
    assert_eq!(t.balance().unwrap(), vec![("EUR".to_owned(), 10_000)]);

    // Audit passes; history shows top-up, purchase, cancel; notifications
    // (no relay configured) are in the Maildir, one per change.
    let audit = env.kb(&["wallet", "audit"]).success().stdout();
    assert!(audit.contains("audit ok"), "{audit}");
    let hist = env.kb(&["wallet", "history", "alice"]).success().stdout();
    assert_eq!(hist.lines().count(), 3, "{hist}");
    let maildir = env.data().join("mail").join("new");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&maildir).map_or(0, |d| d.count()) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_dir(&maildir).unwrap().count(), 3);
}

#[test]
fn many_terminals_buying_at_once_never_overdraw() {
    let (env, issuer) = wallet_env(None, "");
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    t.top_up(
        &voucher(&env, &issuer, "alice", 10_000, "v"),
        pw("alice").1.as_bytes(),
    )
    .unwrap();
    let tcs: Vec<TerminalConfig> = (0..4)
        .map(|i| env.terminal("alice", &format!("a{i}")))
        .collect();
    let ok = Arc::new(Mutex::new(0i64));
    let handles: Vec<_> = tcs
        .into_iter()
        .enumerate()
        .map(|(i, tc)| {
            let ok = ok.clone();
            let addr = b.addr;
            std::thread::spawn(move || {
                let mut t = Terminal::connect(addr, &tc, TIMEOUT).unwrap();
                let (p1, p2) = pw("alice");
                t.login("alice", p1.as_bytes()).unwrap();
                t.release(p2.as_bytes()).unwrap();
                for j in 0..15 {
                    match t.purchase("m1", 300, "EUR", "o", &format!("k-{i}-{j}")) {
                        Ok((after, _)) => {
                            assert!(after >= 0);
                            *ok.lock().unwrap() += 1;
                        }
                        Err(e) => assert_eq!(e.code(), Some(ErrorCode::InsufficientFunds), "{e}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let bought = *ok.lock().unwrap();
    assert_eq!(
        bought,
        10_000 / 300,
        "every purchase the balance covered succeeds"
    );
    // A new session: `t` may have idled out (3 s in tests) while the
    // buyers ran on a loaded machine.
    assert_eq!(
        released(&b, &alice, "alice").balance().unwrap(),
        vec![("EUR".to_owned(), 10_000 - bought * 300)]
    );
    assert!(
        env.kb(&["wallet", "audit"])
            .success()
            .stdout()
            .contains("audit ok")
    );
}

/// What the terminals saw acknowledged before the kill.
#[derive(Default)]
struct Acked {
    /// Idempotency key → decision id.
    purchases: BTreeMap<String, String>,
    /// Every purchase key sent, acknowledged or not.
    tried: BTreeSet<String>,
    /// Decisions whose cancel was acknowledged.
    cancels: BTreeSet<String>,
    /// Voucher ids (hex) whose top-up was acknowledged.
    top_ups: BTreeSet<String>,
    exchanges: usize,
}

/// One terminal's share of the mixed load until the broker dies: role 0
/// and 1 buy, role 2 buys and cancels through the market's authorisation,
/// role 3 exchanges keys and tops up with vouchers.
fn mixed_worker(
    role: usize,
    mut t: Terminal,
    vouchers: Vec<([u8; 16], Vec<u8>)>,
    acked: &Mutex<Acked>,
) {
    let (_, p2) = pw("alice");
    let mut d = (role == 2).then(|| direct(&mut t));
    for j in 0..400 {
        let ok = match role {
            0..=2 => {
                let key = format!("mixed-{role}-{j}");
                acked.lock().unwrap().tried.insert(key.clone());
                match t.purchase("m1", 7, "EUR", "mixed", &key) {
                    Ok((_, r)) => {
                        let decision = decision_of(&r);
                        acked
                            .lock()
                            .unwrap()
                            .purchases
                            .insert(key, decision.clone());
                        match d.as_mut() {
                            Some(d) if j % 2 == 0 => {
                                d.present_receipt(&r).unwrap();
                                let auth = d.cancel_authorisation(&decision).unwrap();
                                let cancelled = t.cancel(&decision, auth).is_ok();
                                if cancelled {
                                    acked.lock().unwrap().cancels.insert(decision);
                                }
                                cancelled
                            }
                            _ => true,
                        }
                    }
                    Err(_) => false,
                }
            }
            _ => match t.exchange("m1") {
                Ok(_) => {
                    acked.lock().unwrap().exchanges += 1;
                    match vouchers.get(j) {
                        Some((id, v)) => {
                            let topped = t.top_up(v, p2.as_bytes()).is_ok();
                            if topped {
                                acked.lock().unwrap().top_ups.insert(hex::encode(id));
                            }
                            topped
                        }
                        None => true,
                    }
                }
                Err(_) => false,
            },
        };
        if !ok {
            return; // the broker died
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn issue_vouchers(issuer: &std::path::Path, n: usize) -> Vec<([u8; 16], Vec<u8>)> {
    let pem = std::fs::read_to_string(issuer.join("issuer.key")).unwrap();
    let key = keybroker::wallet::voucher::pem_der(&pem, "PRIVATE KEY").unwrap();
    (0..n)
        .map(|_| {
            let amount = keybroker::wallet::Amount::new(50, "EUR").unwrap();
            let expiry = keybroker::wallet::now_ms() + 3_600_000;
            let (v, bytes) =
                keybroker::wallet::voucher::issue(&key, "alice", amount, expiry).unwrap();
            (v.id, bytes)
        })
        .collect()
}

fn count(db: &rusqlite::Connection, sql: &str, arg: &str) -> i64 {
    db.query_row(sql, [arg], |r| r.get(0)).unwrap()
}

#[test]
fn sigkill_under_mixed_load_loses_nothing_acknowledged() {
    let port = free_port();
    let (env, issuer) = wallet_env(Some(port), "");
    let relay = Relay::start(port, &env.dir.path().join("relay"));
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let mut b = env.broker();
    released(&b, &alice, "alice")
        .top_up(
            &voucher(&env, &issuer, "alice", 1_000_000, "v"),
            pw("alice").1.as_bytes(),
        )
        .unwrap();
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let handles: Vec<_> = (0..4)
        .map(|role| {
            let tc = env.terminal("alice", &format!("c{role}"));
            let t = released(&b, &tc, "alice");
            let vouchers = if role == 3 {
                issue_vouchers(&issuer, 400)
            } else {
                Vec::new()
            };
            let acked = acked.clone();
            std::thread::spawn(move || mixed_worker(role, t, vouchers, &acked))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = b.child.kill(); // SIGKILL
    let _ = b.child.wait();
    for h in handles {
        h.join().unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        !acked.purchases.is_empty()
            && !acked.cancels.is_empty()
            && !acked.top_ups.is_empty()
            && acked.exchanges > 0,
        "every kind of operation was acknowledged before the kill"
    );
    drop(b);

    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    let ledger = env.data().join("ledger.db");
    let db = rusqlite::Connection::open(&ledger).unwrap();
    // Every acknowledged purchase is there once, under the same decision.
    let hist = env.kb(&["wallet", "history", "alice"]).success().stdout();
    let decisions: Vec<&str> = hist
        .lines()
        .filter(|l| l.contains("\tpurchase\t"))
        .map(|l| l.split('\t').nth(3).unwrap())
        .collect();
    let unique: BTreeSet<&str> = decisions.iter().copied().collect();
    assert_eq!(
        unique.len(),
        decisions.len(),
        "a decision was applied twice"
    );
    for (key, d) in &acked.purchases {
        assert!(
            unique.contains(d.as_str()),
            "acknowledged purchase {key} ({d}) lost"
        );
    }
    // Every acknowledged cancel holds, refunded exactly once, and cannot
    // be repeated; no decision was refunded twice.
    let refunds = "SELECT count(*) FROM entries WHERE kind = 'cancel' AND decision_id = ?1";
    let mut dm = direct(&mut t);
    for d in &acked.cancels {
        assert_eq!(count(&db, refunds, d), 1, "cancel of {d} lost or doubled");
        let auth = dm.cancel_authorisation(d).unwrap();
        assert_eq!(refused(t.cancel(d, auth)), ErrorCode::AlreadyCancelled);
    }
    let doubled: i64 = db
        .query_row(
            "SELECT count(*) FROM (SELECT decision_id FROM entries WHERE kind = 'cancel' \
             GROUP BY decision_id HAVING count(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(doubled, 0, "a decision was refunded twice");
    // Every acknowledged top-up is credited once.
    let credits = "SELECT count(*) FROM entries WHERE kind = 'topup' AND voucher_id = ?1";
    for v in &acked.top_ups {
        assert_eq!(count(&db, credits, v), 1, "top-up {v} lost or doubled");
    }
    // Retrying every purchase key (acknowledged or not) never debits twice.
    let before = t.balance().unwrap()[0].1;
    let mut retried_new = 0;
    for key in &acked.tried {
        let r = match t.purchase("m1", 7, "EUR", "mixed", key) {
            Ok((_, r)) => r,
            // A refunded decision's retry gets no receipt and debits nothing.
            Err(e) if e.code() == Some(ErrorCode::AlreadyCancelled) => {
                if let Some(d) = acked.purchases.get(key) {
                    assert_eq!(count(&db, refunds, d), 1, "{key}: refused as cancelled");
                }
                continue;
            }
            Err(e) => panic!("retry of {key}: {e}"),
        };
        if let Some(d) = acked.purchases.get(key) {
            assert_eq!(&decision_of(&r), d, "a retry of {key} made a new decision");
        }
        if !unique.contains(decision_of(&r).as_str()) {
            retried_new += 1;
        }
    }
    assert_eq!(t.balance().unwrap()[0].1, before - 7 * retried_new);
    let audit = env.kb(&["wallet", "audit"]).success().stdout();
    assert!(audit.contains("audit ok"), "{audit}");
    // Every notification is delivered once or still queued: each
    // decision's Message-ID is at the relay or pending in the outbox, and
    // none arrives twice except one the mailer had in flight at the kill.
    // The restarted mailer may still be sending, so read the outbox before
    // the relay: a row is marked sent only after the relay accepted it.
    std::thread::sleep(Duration::from_secs(3));
    let ids_of = |msgs: Vec<String>| -> Vec<String> {
        msgs.iter()
            .filter_map(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("Message-ID: ").map(|s| s.trim().to_owned()))
            })
            .collect()
    };
    let column = |sql: &str| -> Vec<String> {
        db.prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let pending: BTreeSet<String> = column("SELECT message_id FROM outbox WHERE state = 'pending'")
        .into_iter()
        .collect();
    let delivered = ids_of(relay.messages());
    let all_decisions = column("SELECT id FROM decisions");
    assert_eq!(all_decisions.len(), unique.len() + retried_new as usize);
    let seen: BTreeSet<&String> = delivered.iter().collect();
    let expected = all_decisions
        .iter()
        .map(|d| format!("<decision-{d}@keybroker>"))
        .chain(
            acked
                .cancels
                .iter()
                .map(|d| format!("<cancel-{d}@keybroker>")),
        )
        .chain(
            acked
                .top_ups
                .iter()
                .map(|v| format!("<topup-{v}@keybroker>")),
        );
    for id in expected {
        assert!(
            seen.contains(&id) || pending.contains(&id),
            "notification {id} lost"
        );
    }
    let twice = delivered.len() - seen.len();
    assert!(twice <= 1, "{twice} notifications were delivered twice");
    eprintln!(
        "crash test: {} purchases, {} cancels, {} top-ups, {} exchanges acknowledged; \
         {} decisions, {} mails delivered, {} queued",
        acked.purchases.len(),
        acked.cancels.len(),
        acked.top_ups.len(),
        acked.exchanges,
        all_decisions.len(),
        seen.len(),
        pending.len()
    );
}
