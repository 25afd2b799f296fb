//! The wallet against a real SoftHSM token (`HsmChainMac`), a real SQLite
//! file, and a real SMTP relay on loopback (Python's aiosmtpd).
//!
//! One token for the whole test binary (`common::shared_hsm`).

mod common;

use common::relay::{Relay, free_port};
use common::wait_until;
use common::wallet::{
    INTERVAL, anchored, anchored_seq, anchors_in, assert_audit_ok, assert_gap,
    assert_honest_restore, balance, buy, cancel, check_bad_input, check_cancel_rules,
    check_idempotent_retries, eur, five_anchored_entries, fund, mail, three_more_anchored,
    wait_anchored,
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

// ---- anchors: truncation and rollback (docs/OPERATIONS.md, "Ledger anchors") ----

/// A ledger that anchors into `ledger.anchors` beside it, which a test
/// stops and starts as an operator (or an attacker) would the broker.
struct Anchored {
    dir: tempfile::TempDir,
    ledger: Option<SqliteLedger>,
}

impl Anchored {
    fn new() -> Self {
        let mut a = Self {
            dir: tempfile::tempdir().unwrap(),
            ledger: None,
        };
        a.start();
        a
    }
    fn start(&mut self) {
        assert!(self.ledger.is_none());
        self.ledger = Some(open(&self.db(), anchored(&self.anchors())));
    }
    /// Drops the ledger: its writer anchors the last head on the way out.
    fn stop(&mut self) {
        self.ledger.take();
    }
    fn l(&self) -> &SqliteLedger {
        self.ledger.as_ref().unwrap()
    }
    fn db(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }
    fn anchors(&self) -> PathBuf {
        self.dir.path().join("ledger.anchors")
    }
    fn sql(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.db()).unwrap()
    }
    /// What the attacker of issue 28 did: the append-only trigger dropped,
    /// every entry after `keep` and its decision deleted, `user`'s balance
    /// set to what entry `keep` left.
    fn truncate(&self, keep: i64, user: &str, balance: i64) {
        let c = self.sql();
        c.execute_batch("DROP TRIGGER IF EXISTS entries_no_delete")
            .unwrap();
        c.execute("DELETE FROM entries WHERE seq > ?1", [keep])
            .unwrap();
        c.execute("DELETE FROM decisions WHERE seq > ?1", [keep])
            .unwrap();
        c.execute(
            "UPDATE accounts SET balance = ?1 WHERE user = ?2",
            rusqlite::params![balance, user],
        )
        .unwrap();
    }
    /// A hot copy of the ledger, as `sqlite3 .backup` makes.
    fn backup(&self) -> PathBuf {
        let to = self.dir.path().join("backup.db");
        self.sql()
            .execute("VACUUM INTO ?1", [to.to_str().unwrap()])
            .unwrap();
        to
    }
    /// Puts `backup` in place of the (stopped) ledger.
    fn put_back(&self, backup: &Path) {
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", self.db().display()));
        }
        std::fs::copy(backup, self.db()).unwrap();
    }
}

#[test]
fn a_removed_tail_fails_the_audit_with_the_writer_stopped() {
    let mut f = Anchored::new();
    let after_3 = five_anchored_entries(f.l(), &f.anchors(), "oscar");
    f.stop();
    // The last purchase and its cancel, as in issue 28: the balance does
    // not even change.
    f.truncate(3, "oscar", after_3);
    f.start();
    let why = f.l().refusing().expect("the writer refuses to append");
    assert!(why.contains("ends at entry 3, behind entry 5"), "{why}");
    assert_gap(&f.l().audit().unwrap(), 3, 5);
    assert!(matches!(
        f.l().purchase(buy("oscar", 1, "x")).unwrap_err(),
        WalletError::Storage(e) if e.what().contains("behind entry 5")
    ));
    // Stopped and started again: still caught, nothing appended.
    f.stop();
    f.start();
    assert_gap(&f.l().audit().unwrap(), 3, 5);
    assert_eq!(anchored_seq(&f.anchors()), 5);
}

#[test]
fn a_removed_tail_fails_the_audit_while_the_writer_runs() {
    let f = Anchored::new();
    five_anchored_entries(f.l(), &f.anchors(), "pia");
    let d = f.l().purchase(buy("pia", 400, "run-1")).unwrap();
    assert_eq!((d.seq, d.balance_after), (6, 300));
    wait_anchored(&f.anchors(), 6);
    // A purchase removed and its money given back, under the running
    // writer: money created.
    f.truncate(5, "pia", 700);
    assert_gap(&f.l().audit().unwrap(), 5, 6);
    assert!(matches!(
        f.l().purchase(buy("pia", 1, "run-2")).unwrap_err(),
        WalletError::Storage(_)
    ));
    assert_gap(&f.l().audit().unwrap(), 5, 6);
}

#[test]
fn an_older_copy_fails_the_audit_and_an_honest_restore_passes() {
    let mut f = Anchored::new();
    five_anchored_entries(f.l(), &f.anchors(), "quinn");
    let backup = f.backup();
    three_more_anchored(f.l(), &f.anchors(), "quinn");
    f.stop();
    f.put_back(&backup);
    f.start();
    assert!(f.l().refusing().is_some());
    assert_gap(&f.l().audit().unwrap(), 5, 8);
    // The restore is refused while the restored chain itself is damaged.
    {
        let c = f.sql();
        c.execute_batch("DROP TRIGGER entries_no_update").unwrap();
        c.execute("UPDATE entries SET order_ref = 'x' WHERE seq = 2", [])
            .unwrap();
        let r = f.l().restore("put back the backup of 10:00").unwrap();
        assert!(r.record.is_none() && !r.audit.ok, "{r:?}");
        assert_gap(&f.l().audit().unwrap(), 5, 8);
    }
    f.stop();
    f.put_back(&backup);
    f.start();
    assert_honest_restore(f.l(), "quinn", 5, 8);
    // It holds across a restart, and new heads are anchored after it.
    f.stop();
    f.start();
    assert!(f.l().refusing().is_none());
    assert_audit_ok(f.l());
    assert_eq!(
        anchored_seq(&f.anchors()),
        8,
        "the superseded head stays in the file"
    );
    assert_eq!(
        anchors_in(&f.anchors())
            .last()
            .unwrap()
            .head(0)
            .unwrap()
            .seq,
        6
    );
}

#[test]
fn a_rolled_back_ledger_regrown_by_an_unanchored_writer_fails_the_audit() {
    let mut f = Anchored::new();
    five_anchored_entries(f.l(), &f.anchors(), "rita");
    let backup = f.backup();
    f.l().purchase(buy("rita", 10, "lost")).unwrap();
    wait_anchored(&f.anchors(), 6);
    f.stop();
    f.put_back(&backup);
    // A writer that does not know the anchors (an old binary, a node
    // without the file) appends on the old copy: entry 6 is forked.
    {
        let l = open(&f.db(), LedgerConfig::default());
        for i in 0..3 {
            l.purchase(buy("rita", 20, &format!("fork-{i}"))).unwrap();
        }
    }
    // The ledger is ahead of the anchor (8 > 6) but forked at 6: an audit
    // that only reads (`keybroker wallet audit`) sees it, and a writer
    // that anchors refuses to bless it.
    let forked = |r: &keybroker::wallet::AuditReport| {
        !r.ok
            && r.problems
                .iter()
                .any(|p| p.contains("entry 6 is not the entry anchored at"))
    };
    let mut reader = anchored(&f.anchors());
    reader.anchor.as_mut().unwrap().write = false;
    let r = open(&f.db(), reader).audit().unwrap();
    assert!(forked(&r), "{r:?}");
    f.start();
    let why = f.l().refusing().expect("refuses");
    assert!(
        why.contains("entry 6 is not the entry anchored at"),
        "{why}"
    );
    let r = f.l().audit().unwrap();
    assert!(forked(&r), "{r:?}");
    assert_eq!(anchored_seq(&f.anchors()), 6, "the fork was not anchored");
}

#[test]
fn a_missing_emptied_or_forged_anchor_file_is_caught() {
    let mut f = Anchored::new();
    // A fresh ledger needs no anchor.
    let r = f.l().audit().unwrap();
    assert!(r.ok && r.anchors == 0, "{r:?}");
    five_anchored_entries(f.l(), &f.anchors(), "sam");
    f.stop();
    for emptied in [false, true] {
        if emptied {
            std::fs::write(f.anchors(), "").unwrap();
        } else {
            std::fs::remove_file(f.anchors()).unwrap();
        }
        f.start();
        let why = f.l().refusing().expect("refuses to bless the ledger");
        assert!(why.contains("holds no anchor"), "{why}");
        let r = f.l().audit().unwrap();
        assert!(
            !r.ok && r.problems.iter().any(|p| p.contains("holds no anchor")),
            "{r:?}"
        );
        f.stop();
    }
    f.start();
    let r = f.l().restore("anchor file lost with the old disk").unwrap();
    assert!(r.record.is_some() && r.superseded.is_none(), "{r:?}");
    assert_audit_ok(f.l());
    f.stop();
    // A record made without the HSM key claims a longer ledger.
    let mut forged = anchors_in(&f.anchors()).pop().unwrap();
    forged.heads[0].seq = 100;
    let mut text = std::fs::read_to_string(f.anchors()).unwrap();
    text.push_str(&forged.to_line());
    text.push('\n');
    std::fs::write(f.anchors(), text).unwrap();
    f.start();
    assert!(f.l().refusing().is_none(), "a forged record is ignored");
    let r = f.l().audit().unwrap();
    assert!(
        !r.ok && r.problems[0].contains("line 2: the anchor's MAC does not verify"),
        "{r:?}"
    );
}

/// The window: a committed entry is anchored within `anchor_interval`
/// (plus an fsync and an HSM operation), under load and when the commits
/// stop, and no more than about one record is written per interval.
#[test]
fn every_commit_is_anchored_within_the_interval() {
    let f = Anchored::new();
    fund(f.l(), "tom", eur(1_000_000));
    let start = Instant::now();
    let run = Duration::from_millis(1_500);
    let committed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..4 {
            let (l, committed) = (f.l(), &committed);
            s.spawn(move || {
                let mut i = 0;
                while start.elapsed() < run {
                    let d = l.purchase(buy("tom", 1, &format!("w{t}-{i}"))).unwrap();
                    committed
                        .lock()
                        .unwrap()
                        .push((d.seq, keybroker::wallet::now_ms()));
                    i += 1;
                }
            });
        }
    });
    let committed = committed.into_inner().unwrap();
    let last = committed.iter().map(|c| c.0).max().unwrap();
    // The last ones are anchored by the timer: no commit follows them.
    wait_anchored(&f.anchors(), last);
    let records = anchors_in(&f.anchors());
    let mut worst = 0;
    for (seq, at) in &committed {
        let first = records
            .iter()
            .find(|a| a.head(0).unwrap().seq >= *seq)
            .unwrap();
        worst = worst.max(first.t_ms - at);
    }
    let slack = 250;
    println!(
        "{} commits, {} anchors in {run:?}, longest unanchored {worst} ms (interval {INTERVAL:?})",
        committed.len(),
        records.len()
    );
    assert!(
        worst <= INTERVAL.as_millis() as i64 + slack,
        "an entry stayed unanchored {worst} ms"
    );
    let most = (run.as_millis() / INTERVAL.as_millis()) as usize + 4;
    assert!(records.len() <= most, "{} records", records.len());
    assert_audit_ok(f.l());
}

/// The same attacks on a real broker's data directory, through the CLI:
/// `keybroker wallet audit` exits 1 naming the gap, while the broker runs
/// and after it stopped; the broker refuses to start on the damaged
/// ledger; the audit log catches what a rewritten anchor file hides; and
/// `keybroker restore` after putting a backup back makes the audit pass.
#[test]
fn the_cli_audit_names_the_gap_and_restore_accepts_a_backup() {
    use common::{path_str, pw, released, voucher};
    let (env, issuer) = common::wallet_env(None, "");
    let text = std::fs::read_to_string(&env.config).unwrap();
    let text = text.replace("[wallet]\n", "[wallet]\nanchor_interval_ms = 100\n");
    std::fs::write(&env.config, text).unwrap();
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let log = env.dir.path().join("broker.log");
    let b = env.broker_logging(Some(&log));
    let (db, anchors) = (
        env.data().join("ledger.db"),
        env.data().join("ledger.anchors"),
    );
    let mut t = released(&b, &alice, "alice");
    let v = voucher(&env, &issuer, "alice", 10_000, "v1");
    t.top_up(&v, pw("alice").1.as_bytes()).unwrap();
    let buy = |t: &mut keybroker::terminal::Terminal, k: &str| t.purchase("m1", 100, "EUR", "o", k);
    for i in 0..4 {
        buy(&mut t, &format!("k{i}")).unwrap();
    }
    wait_anchored(&anchors, 5);
    let backup = env.dir.path().join("backup.db");
    let sql = || rusqlite::Connection::open(&db).unwrap();
    sql()
        .execute("VACUUM INTO ?1", [path_str(&backup)])
        .unwrap();
    buy(&mut t, "k4").unwrap();
    buy(&mut t, "k5").unwrap();
    wait_anchored(&anchors, 7);

    // While the broker runs: the last two purchases removed, their money
    // given back.
    sql()
        .execute_batch(
            "DROP TRIGGER entries_no_delete;
             DELETE FROM entries WHERE seq > 5;
             DELETE FROM decisions WHERE seq > 5;
             UPDATE accounts SET balance = 9600 WHERE user = 'alice';",
        )
        .unwrap();
    let failed = |out: common::Output| {
        assert!(!out.0.status.success(), "{}", out.stdout());
        let text = out.stdout();
        assert!(text.contains("audit FAILED"), "{text}");
        text
    };
    let gap = |text: &str| {
        text.contains("the ledger ends at entry 5, but entry 7 was anchored at")
            && text.contains("entries 6..=7 are missing")
    };
    let text = failed(env.kb(&["wallet", "audit"]));
    assert!(gap(&text), "{text}");
    assert_eq!(
        common::refused(buy(&mut t, "k6")),
        keybroker::proto::ErrorCode::Internal
    );
    drop(t);
    b.stop();

    // Stopped: still caught, and the broker refuses to serve it.
    assert!(gap(&failed(env.kb(&["wallet", "audit"]))));
    let serve = env.kb(&["serve"]);
    assert!(!serve.0.status.success());
    assert!(
        serve.stderr().contains("the ledger refuses writes"),
        "{}",
        serve.stderr()
    );

    // Whoever can also rewrite the anchor file drops the records after
    // entry 5: the file alone is consistent again, the audit log is not.
    let kept: String = std::fs::read_to_string(&anchors)
        .unwrap()
        .lines()
        .filter(|l| {
            keybroker::wallet::anchor::Anchor::parse(l).is_ok_and(|a| a.head(0).unwrap().seq <= 5)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&anchors, kept).unwrap();
    env.kb(&["wallet", "audit"]).success();
    let with_log = ["wallet", "audit", "--anchor-log", path_str(&log)];
    let text = failed(env.kb(&with_log));
    assert!(gap(&text) && text.contains("broker.log line"), "{text}");

    // The operator puts the backup back and says so.
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    std::fs::copy(&backup, &db).unwrap();
    let out = env
        .kb(&[
            "restore",
            "--reason",
            "put back the 10:00 backup after the tamper",
        ])
        .success();
    assert!(
        out.stdout().contains("restore recorded"),
        "{}",
        out.stdout()
    );
    let text = env.kb(&with_log).success().stdout();
    assert!(text.contains("audit ok: 5 entries"), "{text}");
    assert!(text.contains("superseded by the restore"), "{text}");

    // The broker serves again, and its new heads are anchored.
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    assert_eq!(buy(&mut t, "k7").unwrap().0, 9_500);
    wait_anchored(&anchors, 6);
    env.kb(&with_log).success();
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
    throughput_of(&f.ledger, "no anchors");
}

/// What anchoring costs the writer: the same run without anchors, with
/// them at the default interval (1 s) and at 10 ms (to magnify the cost),
/// three times each, interleaved.
/// `cargo test --release --test wallet -- --ignored --nocapture throughput_anchors`
#[test]
#[ignore]
fn throughput_anchors() {
    for round in 0..3 {
        let f = Fixture::new();
        throughput_of(&f.ledger, &format!("no anchors, round {round}"));
        for ms in [1000, 10] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = anchored(&dir.path().join("ledger.anchors"));
            cfg.anchor.as_mut().unwrap().interval = Duration::from_millis(ms);
            let l = open(&dir.path().join("ledger.db"), cfg);
            throughput_of(&l, &format!("anchors every {ms} ms, round {round}"));
            drop(l);
            println!(
                "  {} anchor records",
                anchors_in(&dir.path().join("ledger.anchors")).len()
            );
        }
    }
}

/// What one anchor record costs the writer (the `us` of its audit line:
/// verifying the file's newest record, sealing, the write and the fsync),
/// and the audit per record, with records every 10 ms to have many.
/// `cargo test --release --test wallet -- --ignored --nocapture anchor_write_cost`
#[test]
#[ignore]
fn anchor_write_cost() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let file = std::fs::File::create(&log).unwrap();
    tracing_subscriber::fmt()
        .with_env_filter("audit=info")
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .init();
    let mut cfg = anchored(&dir.path().join("ledger.anchors"));
    cfg.anchor.as_mut().unwrap().interval = Duration::from_millis(10);
    let l = open(&dir.path().join("ledger.db"), cfg);
    throughput_of(&l, "anchors every 10 ms");
    let mut us: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| l.rsplit_once(" us=")?.1.split(' ').next()?.parse().ok())
        .collect();
    us.sort_unstable();
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    println!(
        "{} anchor writes: median {} µs, p90 {} µs, max {} µs",
        us.len(),
        at(0.5),
        at(0.9),
        at(1.0)
    );
    let records = anchors_in(&dir.path().join("ledger.anchors")).len();
    let t = Instant::now();
    let r = l.audit().unwrap();
    let with = t.elapsed();
    drop(l);
    let bare = open(&dir.path().join("ledger.db"), LedgerConfig::default());
    let t = Instant::now();
    bare.audit().unwrap();
    let without = t.elapsed();
    println!(
        "audit of {} entries: {with:?} with {records} anchor records, {without:?} without",
        r.entries
    );
}

/// 64 threads buying 1 cent for 3 s, then the audit.
fn throughput_of(l: &SqliteLedger, what: &str) {
    for _ in 0..10 {
        fund(l, "bench", eur(MAX_AMOUNT));
    }
    let done = AtomicU64::new(0);
    let secs = 3;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..64 {
            let done = &done;
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
        "group commit, synchronous=FULL, HSM HMAC chain, 64 submitters, {what}: {n} purchases in {el:.2}s = {:.0}/s",
        n as f64 / el
    );
    let t = Instant::now();
    let r = l.audit().unwrap();
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
