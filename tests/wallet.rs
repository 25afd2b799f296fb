//! The wallet against a real SoftHSM token (`HsmChainMac`), a real SQLite
//! file, and a real SMTP relay on loopback (Python's aiosmtpd).
//!
//! One token for the whole test binary (`common::shared_hsm`).

mod common;

use common::relay::{Relay, free_port};
use common::wait_until;
use common::wallet::{
    assert_audit_ok, balance, buy, cancel, check_bad_input, check_cancel_rules,
    check_idempotent_retries, eur, fund, mail,
};
use keybroker::hsm::Hsm;
use keybroker::wallet::mailer::{Mailer, MailerConfig, Transport, outbox_pending};
use keybroker::wallet::voucher;
use keybroker::wallet::{
    ChainMac, HsmChainMac, Ledger, LedgerConfig, MAX_AMOUNT, SqliteLedger, TopUpRequest,
    WalletError,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn hsm() -> Arc<Hsm> {
    common::shared_hsm()
}

struct Fixture {
    dir: tempfile::TempDir,
    ledger: SqliteLedger,
}

impl Fixture {
    fn new() -> Self {
        Self::with(LedgerConfig::default())
    }
    fn with(cfg: LedgerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ledger = open(&dir.path().join("ledger.db"), cfg);
        Self { dir, ledger }
    }
    fn db(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }
    fn sql(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.db()).unwrap()
    }
}

fn open(path: &Path, cfg: LedgerConfig) -> SqliteLedger {
    let hsm = hsm();
    SqliteLedger::open(
        path,
        cfg,
        Box::new(move || Ok(Box::new(HsmChainMac::new(hsm)?) as Box<dyn ChainMac>)),
    )
    .expect("open ledger")
}

#[test]
fn concurrent_purchases_never_overdraw() {
    let f = Fixture::new();
    fund(&f.ledger, "alice", eur(10_000));
    let spent = AtomicI64::new(0);
    let refused = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..16 {
            let (l, spent, refused) = (&f.ledger, &spent, &refused);
            s.spawn(move || {
                for i in 0..40 {
                    let amount = 1 + (t * 37 + i * 101) % 500;
                    match l.purchase(buy("alice", amount, &format!("k{t}-{i}"))) {
                        Ok(d) => {
                            assert!(d.balance_after >= 0);
                            spent.fetch_add(amount, Ordering::Relaxed);
                        }
                        Err(WalletError::InsufficientFunds) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            });
        }
    });
    let spent = spent.into_inner();
    assert!(
        refused.into_inner() > 0,
        "the test should exhaust the balance"
    );
    assert_eq!(balance(&f.ledger, "alice"), 10_000 - spent);
    assert!(balance(&f.ledger, "alice") >= 0);
    let h = f.ledger.history("alice").unwrap();
    let debited: i64 = h.iter().skip(1).map(|e| e.amount.minor).sum();
    assert_eq!(debited, spent);
    assert_audit_ok(&f.ledger);
}

#[test]
fn idempotent_retries_return_the_first_decision_and_debit_once() {
    let f = Fixture::new();
    let first = check_idempotent_retries(&f.ledger);
    // One mail per decision, with the stable Message-ID.
    let c = f.sql();
    let n: i64 = c
        .query_row(
            "SELECT count(*) FROM outbox WHERE message_id = ?1",
            [format!("<decision-{}@keybroker>", first.id)],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn cancel_refunds_once_and_only_for_the_owner() {
    let f = Fixture::new();
    check_cancel_rules(&f.ledger);
    assert_eq!(outbox_pending(&f.db()).unwrap(), 3);
    assert_audit_ok(&f.ledger);
}

#[test]
fn vouchers_credit_once() {
    let f = Fixture::new();
    let (sk_pem, pk_pem) = voucher::generate_issuer_key().unwrap();
    let sk = voucher::pem_der(&sk_pem, "PRIVATE KEY").unwrap();
    let pk = voucher::pem_der(&pk_pem, "PUBLIC KEY").unwrap();
    let now = keybroker::wallet::now_ms();
    let (_, bytes) = voucher::issue(&sk, "frank", eur(2_500), now + 60_000).unwrap();
    let v = voucher::verify(&pk, &bytes, now).unwrap();
    let req = TopUpRequest::from_voucher(&v, "frank@example.org");
    let e = f.ledger.top_up(req.clone()).unwrap();
    assert_eq!(e.balance_after, 2_500);
    assert_eq!(f.ledger.top_up(req).unwrap_err(), WalletError::VoucherUsed);
    assert_eq!(balance(&f.ledger, "frank"), 2_500);
    let (_, old) = voucher::issue(&sk, "frank", eur(1), now - 1).unwrap();
    assert_eq!(
        voucher::verify(&pk, &old, now).unwrap_err(),
        WalletError::BadVoucher("expired")
    );
    let (other_sk, _) = voucher::generate_issuer_key().unwrap();
    let other = voucher::pem_der(&other_sk, "PRIVATE KEY").unwrap();
    let (_, forged) = voucher::issue(&other, "frank", eur(1), now + 60_000).unwrap();
    assert!(voucher::verify(&pk, &forged, now).is_err());
    assert_audit_ok(&f.ledger);
}

#[test]
fn bad_amounts_and_currencies_change_nothing() {
    let f = Fixture::new();
    check_bad_input(&f.ledger);
}

#[test]
fn overflowing_sums_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let l = open(&db, LedgerConfig::default());
    fund(&l, "hal", eur(MAX_AMOUNT));
    // Forge a huge balance directly (the audit will object), then try to
    // push it past i64::MAX.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE accounts SET balance = ?1", [i64::MAX - 10])
        .unwrap();
    let top = TopUpRequest {
        user: "hal".into(),
        amount: eur(100),
        voucher_id: "big".into(),
        mail_to: mail("hal"),
    };
    assert_eq!(l.top_up(top).unwrap_err(), WalletError::Overflow);
    assert_eq!(balance(&l, "hal"), i64::MAX - 10);
    assert!(!l.audit().unwrap().ok);
}

#[test]
fn tampering_is_detected_by_the_audit() {
    let f = Fixture::new();
    fund(&f.ledger, "ivan", eur(1_000));
    f.ledger.purchase(buy("ivan", 100, "t1")).unwrap();
    f.ledger.purchase(buy("ivan", 200, "t2")).unwrap();
    assert_audit_ok(&f.ledger);
    let c = f.sql();
    assert!(
        c.execute("UPDATE entries SET amount = 1 WHERE seq = 2", [])
            .is_err()
    );
    assert!(c.execute("DELETE FROM entries WHERE seq = 3", []).is_err());
    assert!(
        c.execute("UPDATE accounts SET balance = -1", []).is_err(),
        "CHECK balance >= 0"
    );

    // A balance changed behind the ledger's back.
    c.execute("UPDATE accounts SET balance = 5000 WHERE user = 'ivan'", [])
        .unwrap();
    let r = f.ledger.audit().unwrap();
    assert!(!r.ok);
    assert!(
        r.problems.iter().any(|p| p.contains("stored balance 5000")),
        "{:?}",
        r.problems
    );
    c.execute("UPDATE accounts SET balance = 700 WHERE user = 'ivan'", [])
        .unwrap();
    assert_audit_ok(&f.ledger);

    // An entry changed after dropping the append-only trigger.
    c.execute_batch("DROP TRIGGER entries_no_update").unwrap();
    c.execute(
        "UPDATE entries SET amount = 1, balance_after = 899 WHERE seq = 2",
        [],
    )
    .unwrap();
    let r = f.ledger.audit().unwrap();
    assert!(!r.ok);
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("entry 2: MAC mismatch")),
        "{:?}",
        r.problems
    );
    assert_eq!(r.entries, 3);
}

#[test]
fn removed_entries_break_the_chain() {
    let f = Fixture::new();
    fund(&f.ledger, "judy", eur(1_000));
    f.ledger.purchase(buy("judy", 100, "r1")).unwrap();
    f.ledger.purchase(buy("judy", 100, "r2")).unwrap();
    let c = f.sql();
    c.execute_batch("DROP TRIGGER entries_no_delete").unwrap();
    c.execute("DELETE FROM entries WHERE seq = 2", []).unwrap();
    c.execute("UPDATE accounts SET balance = 900", []).unwrap();
    let r = f.ledger.audit().unwrap();
    assert!(!r.ok);
    assert!(
        r.problems.iter().any(|p| p.contains("entry 3")),
        "{:?}",
        r.problems
    );
}

// ---- mail ----

fn message_ids(msgs: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = msgs
        .iter()
        .filter_map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Message-ID: ").map(|s| s.trim().to_owned()))
        })
        .collect();
    ids.sort();
    ids
}

fn outbox_ids(db: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT message_id FROM outbox ORDER BY message_id")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn fast(transport: Transport) -> MailerConfig {
    let mut c = MailerConfig::new(transport);
    c.poll = Duration::from_millis(50);
    c.backoff_min = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(400);
    c.timeout = Duration::from_secs(5);
    c
}

#[test]
fn mailer_delivers_each_message_once_over_smtp() {
    let f = Fixture::new();
    fund(&f.ledger, "kim", eur(1_000));
    let d = f.ledger.purchase(buy("kim", 100, "m1")).unwrap();
    f.ledger.cancel(cancel("kim", &d.id)).unwrap();
    for i in 0..5 {
        f.ledger
            .purchase(buy("kim", 10, &format!("m{}", i + 2)))
            .unwrap();
    }
    assert_eq!(outbox_pending(&f.db()).unwrap(), 8);
    let port = free_port();
    let relay = Relay::start(port, &f.dir.path().join("relay"));
    let mailer = Mailer::start(
        &f.db(),
        fast(Transport::Smtp {
            host: "127.0.0.1".into(),
            port,
        }),
    )
    .unwrap();
    wait_until("the outbox to drain", Duration::from_secs(20), || {
        outbox_pending(&f.db()).unwrap() == 0
    });
    std::thread::sleep(Duration::from_millis(300));
    mailer.stop();
    let msgs = relay.messages();
    assert_eq!(msgs.len(), 8);
    assert_eq!(message_ids(&msgs), outbox_ids(&f.db()));
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("<decision-{}@keybroker>", d.id))
                && m.contains("To: kim@example.org"))
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("<cancel-{}@keybroker>", d.id)))
    );
}

#[test]
fn mail_waits_for_a_relay_that_is_down() {
    let f = Fixture::new();
    fund(&f.ledger, "lee", eur(1_000));
    for i in 0..4 {
        f.ledger.purchase(buy("lee", 10, &format!("d{i}"))).unwrap();
    }
    let port = free_port();
    let mailer = Mailer::start(
        &f.db(),
        fast(Transport::Smtp {
            host: "127.0.0.1".into(),
            port,
        }),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        outbox_pending(&f.db()).unwrap(),
        5,
        "nothing delivered while down"
    );
    let attempts: i64 = f
        .sql()
        .query_row("SELECT max(attempts) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert!(attempts >= 1, "the mailer tried");
    // New mail queued during the outage is kept too.
    f.ledger.purchase(buy("lee", 10, "d-late")).unwrap();
    let relay = Relay::start(port, &f.dir.path().join("relay"));
    wait_until("the outbox to drain", Duration::from_secs(20), || {
        outbox_pending(&f.db()).unwrap() == 0
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(mailer);
    let msgs = relay.messages();
    assert_eq!(msgs.len(), 6);
    assert_eq!(message_ids(&msgs), outbox_ids(&f.db()));
}

#[test]
fn mailer_writes_a_maildir_without_a_relay() {
    let f = Fixture::new();
    fund(&f.ledger, "max", eur(1_000));
    f.ledger.purchase(buy("max", 10, "md")).unwrap();
    let md = f.dir.path().join("Maildir");
    let mailer = Mailer::start(&f.db(), fast(Transport::Maildir(md.clone()))).unwrap();
    wait_until("the outbox to drain", Duration::from_secs(10), || {
        outbox_pending(&f.db()).unwrap() == 0
    });
    mailer.stop();
    assert_eq!(std::fs::read_dir(md.join("new")).unwrap().count(), 2);
    assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    assert!(md.join("cur").is_dir());
}

#[test]
fn mailer_of_a_running_ledger_leaves_its_marks_to_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let ledger = Arc::new(open(&db, LedgerConfig::default()));
    fund(&*ledger, "mia", eur(1_000));
    ledger.purchase(buy("mia", 10, "w1")).unwrap();
    let md = dir.path().join("Maildir");
    let mailer = Mailer::start_ledger(&ledger, &db, fast(Transport::Maildir(md.clone()))).unwrap();
    // Purchases keep coming while the mailer marks rows through the writer.
    for i in 0..20 {
        ledger
            .purchase(buy("mia", 1, &format!("w-more-{i}")))
            .unwrap();
    }
    wait_until("the outbox to drain", Duration::from_secs(10), || {
        outbox_pending(&db).unwrap() == 0
    });
    mailer.stop();
    assert_eq!(std::fs::read_dir(md.join("new")).unwrap().count(), 22);
    assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    let report = ledger.audit().unwrap();
    assert!(report.ok, "{:?}", report.problems);
    // Every row is marked once, by the writer: none is left pending and
    // none was delivered twice.
    assert_eq!(message_ids(&maildir_messages(&md)), outbox_ids(&db));
}

fn maildir_messages(md: &Path) -> Vec<String> {
    std::fs::read_dir(md.join("new"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect()
}

/// `cargo test --release --test wallet -- --ignored --nocapture throughput`
#[test]
#[ignore]
fn throughput() {
    let f = Fixture::new();
    for _ in 0..10 {
        fund(&f.ledger, "bench", eur(MAX_AMOUNT));
    }
    let done = AtomicU64::new(0);
    let secs = 3;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..64 {
            let (l, done) = (&f.ledger, &done);
            s.spawn(move || {
                let mut i = 0u64;
                while start.elapsed() < Duration::from_secs(secs) {
                    match l.purchase(buy("bench", 1, &format!("b{t}-{i}"))) {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(WalletError::Busy) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                    i += 1;
                }
            });
        }
    });
    let n = done.into_inner();
    let el = start.elapsed().as_secs_f64();
    println!(
        "group commit, synchronous=FULL, HSM HMAC chain, 64 submitters: {n} purchases in {el:.2}s = {:.0}/s",
        n as f64 / el
    );
    let t = Instant::now();
    let r = f.ledger.audit().unwrap();
    println!(
        "audit of {} entries: {:.2}s, ok={}",
        r.entries,
        t.elapsed().as_secs_f64(),
        r.ok
    );
    assert!(r.ok);
}

/// The writer's own capacity: one submitter keeps 2048 purchases in flight
/// through the async API (as compio core threads would).
/// `cargo test --test wallet -- --ignored --nocapture throughput_async`
#[test]
#[ignore]
fn throughput_async() {
    let f = Fixture::new();
    for _ in 0..10 {
        fund(&f.ledger, "bench", eur(MAX_AMOUNT));
    }
    let mut inflight = std::collections::VecDeque::new();
    let (mut sent, mut done) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) || !inflight.is_empty() {
        while inflight.len() < 2048 && start.elapsed() < Duration::from_secs(3) {
            inflight.push_back(
                f.ledger
                    .purchase_async(buy("bench", 1, &format!("a{sent}"))),
            );
            sent += 1;
        }
        let Some(front) = inflight.front_mut() else {
            break;
        };
        match front.try_recv() {
            Ok(Some(r)) => {
                match r {
                    Ok(_) => done += 1,
                    Err(WalletError::Busy) => {}
                    Err(e) => panic!("{e}"),
                }
                inflight.pop_front();
            }
            Ok(None) => std::thread::sleep(Duration::from_micros(50)),
            Err(_) => panic!("writer gone"),
        }
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "group commit, synchronous=FULL, HSM HMAC chain, 2048 in flight (async): {done} purchases in {el:.2}s = {:.0}/s",
        done as f64 / el
    );
    assert!(f.ledger.audit().unwrap().ok);
}
