//! The wallet on a real PostgreSQL server (a throwaway cluster started by
//! `common::pg`, stopped when the tests are done) with the chain MAC on
//! the real SoftHSM token (`HsmChainMac`, `common::shared_hsm`). Each test
//! has a database of its own.

mod common;

use common::pg::{PgServer, server};
use common::wallet::{
    anchored, assert_audit_ok, assert_gap, assert_honest_restore, balance, buy, cancel,
    check_bad_input, check_cancel_rules, check_idempotent_retries, eur, five_anchored_entries,
    fund, mail, three_more_anchored, wait_anchored,
};
use keybroker::wallet::mailer::{Mailer, MailerConfig, Outbox, Transport};
use keybroker::wallet::pg::PgOutbox;
use keybroker::wallet::{
    ChainMac, HsmChainMac, Ledger, LedgerConfig, MAX_AMOUNT, PgConnect, PgLedger, SqliteLedger,
    TopUpRequest, WalletError,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Fields drop in order: the ledger before the server it talks to.
struct Fixture {
    ledger: PgLedger,
    db: PgConnect,
    _pg: Arc<PgServer>,
}

impl Fixture {
    fn new() -> Self {
        let pg = server();
        let db = PgConnect::new(&pg.url(&pg.new_db("wallet")));
        let ledger = open(&db, LedgerConfig::default());
        Self {
            ledger,
            db,
            _pg: pg,
        }
    }
    fn sql(&self) -> postgres::Client {
        self.db.connect().unwrap()
    }
}

fn mac() -> keybroker::wallet::ledger::MacFactory {
    let hsm = common::shared_hsm();
    Box::new(move || Ok(Box::new(HsmChainMac::new(hsm)?) as Box<dyn ChainMac>))
}

fn open(db: &PgConnect, cfg: LedgerConfig) -> PgLedger {
    PgLedger::connect(db, cfg, mac()).expect("open the PostgreSQL ledger")
}

/// 16 threads × 40 purchases on `ledgers` (round robin); returns what was
/// spent and how many were refused.
fn hammer(ledgers: &[&dyn Ledger], user: &str) -> (i64, u64) {
    let spent = AtomicI64::new(0);
    let refused = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..16i64 {
            let (l, spent, refused) = (ledgers[t as usize % ledgers.len()], &spent, &refused);
            s.spawn(move || {
                for i in 0..40 {
                    let amount = 1 + (t * 37 + i * 101) % 500;
                    match l.purchase(buy(user, amount, &format!("k{t}-{i}"))) {
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
    (spent.into_inner(), refused.into_inner())
}

#[test]
fn concurrent_purchases_never_overdraw() {
    let f = Fixture::new();
    fund(&f.ledger, "alice", eur(10_000));
    let (spent, refused) = hammer(&[&f.ledger], "alice");
    assert!(refused > 0, "the test should exhaust the balance");
    assert_eq!(balance(&f.ledger, "alice"), 10_000 - spent);
    let h = f.ledger.history("alice").unwrap();
    let debited: i64 = h.iter().skip(1).map(|e| e.amount.minor).sum();
    assert_eq!(debited, spent);
    assert_audit_ok(&f.ledger);
}

#[test]
fn two_nodes_on_one_database_keep_one_chain() {
    let f = Fixture::new();
    // A second broker node: its own writer, connections and HSM session.
    let other = open(&f.db, LedgerConfig::default());
    fund(&f.ledger, "nina", eur(10_000));
    fund(&other, "nina", eur(5_000));
    let (spent, refused) = hammer(&[&f.ledger, &other], "nina");
    assert!(refused > 0, "the test should exhaust the balance");
    assert_eq!(balance(&f.ledger, "nina"), 15_000 - spent);
    assert_eq!(balance(&other, "nina"), 15_000 - spent);
    let h = other.history("nina").unwrap();
    assert!(h.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert!(h.windows(2).all(|w| w[1].prev_mac == w[0].mac));
    // A purchase through one node, its cancel through the other.
    fund(&f.ledger, "nina", eur(1_000));
    let d = f.ledger.purchase(buy("nina", 700, "cross")).unwrap();
    assert_eq!(
        other.purchase(buy("nina", 700, "cross")).unwrap(),
        d,
        "idempotency holds across nodes"
    );
    let e = other.cancel(cancel("nina", &d.id)).unwrap();
    assert_eq!(e.amount, eur(700));
    assert_eq!(
        f.ledger.cancel(cancel("nina", &d.id)).unwrap_err(),
        WalletError::AlreadyCancelled
    );
    assert_eq!(balance(&f.ledger, "nina"), 16_000 - spent);
    assert_audit_ok(&f.ledger);
    assert_audit_ok(&other);
}

#[test]
fn idempotent_retries_return_the_first_decision_and_debit_once() {
    let f = Fixture::new();
    let first = check_idempotent_retries(&f.ledger);
    let n: i64 = f
        .sql()
        .query_one(
            "SELECT count(*) FROM outbox WHERE message_id = $1",
            &[&format!("<decision-{}@keybroker>", first.id)],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn cancel_and_top_up_rules() {
    let f = Fixture::new();
    check_cancel_rules(&f.ledger);
    let top = TopUpRequest {
        user: "dave".into(),
        amount: eur(250),
        voucher_id: "v-once".into(),
        mail_to: mail("dave"),
    };
    assert_eq!(f.ledger.top_up(top.clone()).unwrap().balance_after, 1_250);
    assert_eq!(f.ledger.top_up(top).unwrap_err(), WalletError::VoucherUsed);
    assert_eq!(balance(&f.ledger, "dave"), 1_250);
    let mut outbox = PgOutbox::connect(&f.db).unwrap();
    assert_eq!(outbox.pending().unwrap(), 4);
    assert_audit_ok(&f.ledger);
}

#[test]
fn bad_input_is_refused_with_typed_errors_and_changes_nothing() {
    let f = Fixture::new();
    check_bad_input(&f.ledger);
}

#[test]
fn tampering_is_detected_by_the_audit() {
    let f = Fixture::new();
    fund(&f.ledger, "ivan", eur(1_000));
    f.ledger.purchase(buy("ivan", 100, "t1")).unwrap();
    f.ledger.purchase(buy("ivan", 200, "t2")).unwrap();
    assert_audit_ok(&f.ledger);
    let mut c = f.sql();
    let refused = |c: &mut postgres::Client, sql: &str| {
        let e = c.batch_execute(sql).unwrap_err();
        e.as_db_error().map(|d| d.message().to_owned())
    };
    assert_eq!(
        refused(&mut c, "UPDATE entries SET amount = 1 WHERE seq = 2").as_deref(),
        Some("ledger entries are append-only")
    );
    assert_eq!(
        refused(&mut c, "DELETE FROM entries WHERE seq = 3").as_deref(),
        Some("ledger entries are append-only")
    );
    assert_eq!(
        refused(&mut c, "TRUNCATE entries").as_deref(),
        Some("ledger entries are append-only")
    );
    assert!(
        refused(&mut c, "UPDATE accounts SET balance = -1")
            .is_some_and(|m| m.contains("check constraint")),
        "CHECK balance >= 0"
    );

    c.batch_execute(r#"UPDATE accounts SET balance = 5000 WHERE "user" = 'ivan'"#)
        .unwrap();
    let r = f.ledger.audit().unwrap();
    assert!(!r.ok);
    assert!(
        r.problems.iter().any(|p| p.contains("stored balance 5000")),
        "{:?}",
        r.problems
    );
    c.batch_execute(r#"UPDATE accounts SET balance = 700 WHERE "user" = 'ivan'"#)
        .unwrap();
    assert_audit_ok(&f.ledger);

    c.batch_execute("DROP TRIGGER entries_no_update ON entries")
        .unwrap();
    c.batch_execute("UPDATE entries SET amount = 1, balance_after = 899 WHERE seq = 2")
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

    c.batch_execute("DROP TRIGGER entries_no_delete ON entries; DELETE FROM entries WHERE seq = 3")
        .unwrap();
    let r = f.ledger.audit().unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("lacks entry 3")),
        "{:?}",
        r.problems
    );
    // The writer refuses to append to a chain that lost entries.
    assert!(matches!(
        f.ledger.purchase(buy("ivan", 1, "after")).unwrap_err(),
        WalletError::Storage(m) if m.what().contains("went back")
    ));
}

// ---- anchors: truncation and rollback (docs/OPERATIONS.md, "Ledger anchors") ----

/// A database, and a node whose writer anchors into a file of its own.
struct PgAnchored {
    ledger: Option<PgLedger>,
    db: PgConnect,
    name: String,
    dir: tempfile::TempDir,
    pg: Arc<PgServer>,
}

impl PgAnchored {
    fn new() -> Self {
        let pg = server();
        let name = pg.new_db("anchor");
        let mut f = Self {
            ledger: None,
            db: PgConnect::new(&pg.url(&name)),
            name,
            dir: tempfile::tempdir().unwrap(),
            pg,
        };
        f.start();
        f
    }
    fn anchors(&self) -> std::path::PathBuf {
        self.dir.path().join("ledger.anchors")
    }
    fn start(&mut self) {
        self.ledger = Some(open(&self.db, anchored(&self.anchors())));
    }
    fn stop(&mut self) {
        self.ledger.take();
    }
    fn l(&self) -> &PgLedger {
        self.ledger.as_ref().unwrap()
    }
    /// Drops the append-only trigger, deletes the entries after `keep`
    /// and their decisions, and sets `user`'s balance to `balance`.
    fn truncate(&self, keep: i64, user: &str, balance: i64) {
        let mut c = self.db.connect().unwrap();
        c.batch_execute("DROP TRIGGER IF EXISTS entries_no_delete ON entries")
            .unwrap();
        c.execute("DELETE FROM entries WHERE seq > $1", &[&keep])
            .unwrap();
        c.execute("DELETE FROM decisions WHERE seq > $1", &[&keep])
            .unwrap();
        c.execute(
            r#"UPDATE accounts SET balance = $1 WHERE "user" = $2"#,
            &[&balance, &user],
        )
        .unwrap();
    }
    /// Runs `sql` on the server's maintenance database (the ledger's own
    /// must have no connection for these).
    fn admin(&self, sql: &str) {
        PgConnect::new(&self.pg.url("postgres"))
            .connect()
            .unwrap()
            .batch_execute(sql)
            .unwrap();
    }
}

#[test]
fn a_removed_tail_fails_the_audit_on_postgres_running_and_stopped() {
    let mut f = PgAnchored::new();
    five_anchored_entries(f.l(), &f.anchors(), "olga");
    let d = f.l().purchase(buy("olga", 400, "run-1")).unwrap();
    wait_anchored(&f.anchors(), d.seq);
    // A second node, with its own anchor file, sees the same chain. It
    // joins a ledger that has entries, so it starts from a deliberate
    // record of the head it found.
    let dir_b = tempfile::tempdir().unwrap();
    let anchors_b = dir_b.path().join("ledger.anchors");
    let node_b = open(&f.db, anchored(&anchors_b));
    assert!(node_b.refusing().unwrap().contains("holds no anchor"));
    let r = node_b.restore("node b joins the cluster").unwrap();
    assert_eq!(r.record.unwrap().head(0).unwrap().seq, 6);
    node_b.purchase(buy("olga", 100, "run-2")).unwrap();
    wait_anchored(&anchors_b, 7);
    // While both run: the two purchases removed, their money given back.
    f.truncate(5, "olga", 700);
    assert_gap(&f.l().audit().unwrap(), 5, 6);
    assert_gap(&node_b.audit().unwrap(), 5, 7);
    assert!(matches!(
        f.l().purchase(buy("olga", 1, "run-3")).unwrap_err(),
        WalletError::Storage(_)
    ));
    drop(node_b);
    f.stop();
    f.start();
    assert!(f.l().refusing().unwrap().contains("behind entry 6"));
    assert_gap(&f.l().audit().unwrap(), 5, 6);
    let b = open(&f.db, anchored(&anchors_b));
    assert!(b.refusing().unwrap().contains("behind entry 7"));
}

#[test]
fn an_older_copy_fails_the_audit_on_postgres_and_an_honest_restore_passes() {
    let mut f = PgAnchored::new();
    five_anchored_entries(f.l(), &f.anchors(), "pete");
    f.stop();
    // The backup: a copy of the whole database.
    let copy = format!("{}_backup", f.name);
    f.admin(&format!("CREATE DATABASE {copy} TEMPLATE {}", f.name));
    f.start();
    three_more_anchored(f.l(), &f.anchors(), "pete");
    f.stop();
    f.admin(&format!("DROP DATABASE {}", f.name));
    f.admin(&format!("ALTER DATABASE {copy} RENAME TO {}", f.name));
    f.start();
    assert!(f.l().refusing().is_some());
    assert_gap(&f.l().audit().unwrap(), 5, 8);
    assert_honest_restore(f.l(), "pete", 5, 8);
    f.stop();
    f.start();
    assert!(f.l().refusing().is_none());
    assert_audit_ok(f.l());
}

/// A series' value in this process's metrics (other tests of this binary
/// only add to it).
fn observed(series: &str) -> f64 {
    keybroker::metrics::render()
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn mailer_drains_the_postgres_outbox_once() {
    let commits = || observed("keybroker_ledger_commit_duration_seconds_count");
    let groups = || observed("keybroker_ledger_group_size_count");
    let mails = || observed("keybroker_mail_delivery_duration_seconds_count");
    let (commits0, groups0, mails0) = (commits(), groups(), mails());
    let f = Fixture::new();
    fund(&f.ledger, "max", eur(1_000));
    for i in 0..5 {
        f.ledger
            .purchase(buy("max", 10, &format!("md{i}")))
            .unwrap();
    }
    let md = tempfile::tempdir().unwrap();
    let mut cfg = MailerConfig::new(Transport::Maildir(md.path().to_path_buf()));
    cfg.poll = Duration::from_millis(50);
    // Two nodes' mailers on one outbox: each row goes out once.
    let a = Mailer::start_outbox(PgOutbox::connect(&f.db).unwrap(), cfg.clone()).unwrap();
    let b = Mailer::start_outbox(PgOutbox::connect(&f.db).unwrap(), cfg).unwrap();
    let mut outbox = PgOutbox::connect(&f.db).unwrap();
    let start = Instant::now();
    while outbox.pending().unwrap() != 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "outbox drained");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.stop();
    b.stop();
    assert_eq!(std::fs::read_dir(md.path().join("new")).unwrap().count(), 6);
    // The PostgreSQL writer feeds the same ledger metrics as SQLite's: a
    // top-up and five purchases, each its own group; six mails handed over.
    assert!(commits() >= commits0 + 6.0, "ledger commits counted");
    assert!(groups() >= groups0 + 6.0, "ledger groups counted");
    assert!(mails() >= mails0 + 6.0, "mail deliveries counted");
}

#[test]
fn passwords_stay_out_of_the_connection_string() {
    let pg = server();
    let mut db = PgConnect::new(&format!("{} password=secret", pg.url("postgres")));
    let e = PgLedger::connect(&db, LedgerConfig::default(), mac())
        .err()
        .expect("refused");
    assert!(!e.to_string().contains("secret"), "{e}");
    // From a file instead (trust authentication ignores it).
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg.pw");
    std::fs::write(&pw, "secret\n").unwrap();
    db.url = pg.url(&pg.new_db("pw"));
    db.password_file = Some(pw);
    let l = PgLedger::connect(&db, LedgerConfig::default(), mac()).unwrap();
    assert_audit_ok(&l);
}

/// Purchases of 1 cent by 64 threads for 3 s; `tag` keeps idempotency keys apart.
fn throughput_of(l: &dyn Ledger, tag: &str) -> (u64, f64) {
    for _ in 0..10 {
        fund(l, "bench", eur(MAX_AMOUNT));
    }
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..64 {
            let done = &done;
            s.spawn(move || {
                let mut i = 0u64;
                while start.elapsed() < Duration::from_secs(3) {
                    match l.purchase(buy("bench", 1, &format!("{tag}{t}-{i}"))) {
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
    (done.into_inner(), start.elapsed().as_secs_f64())
}

/// `cargo test --release --test wallet_pg -- --ignored --nocapture throughput`
#[test]
#[ignore]
fn throughput_postgres_against_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteLedger::open(&dir.path().join("l.db"), LedgerConfig::default(), mac()).unwrap();
    let (n, el) = throughput_of(&sqlite, "s");
    println!(
        "sqlite   (synchronous=FULL), 1 writer, 64 submitters: {n} purchases in {el:.2}s = {:.0}/s",
        n as f64 / el
    );
    assert_audit_ok(&sqlite);
    let f = Fixture::new();
    let (n, el) = throughput_of(&f.ledger, "p");
    println!(
        "postgres (fsync on, synchronous_commit on), 1 writer, 64 submitters: {n} purchases in {el:.2}s = {:.0}/s",
        n as f64 / el
    );
    assert_audit_ok(&f.ledger);
    let other = open(&f.db, LedgerConfig::default());
    let (done, start) = (AtomicU64::new(0), Instant::now());
    std::thread::scope(|s| {
        for (k, l) in [&f.ledger as &dyn Ledger, &other].into_iter().enumerate() {
            let done = &done;
            s.spawn(move || {
                let (n, _) = throughput_of(l, &format!("n{k}-"));
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    let (n, el) = (done.into_inner(), start.elapsed().as_secs_f64());
    println!(
        "postgres, 2 writers (two nodes) on one database, 64 submitters each: {n} purchases in {el:.2}s = {:.0}/s",
        n as f64 / el
    );
    assert_audit_ok(&other);
}
