//! `keybroker backup` of a live appliance while purchases run, and
//! `keybroker restore` of it into a fresh data directory (issue 23): the
//! audit is clean, and the ledger holds every purchase acknowledged
//! before the backup began and nothing that was not acknowledged.
//! Real SoftHSM, real SQLite files, a real broker over sockets.

mod common;

use common::*;
use keybroker::receipt::SignedReceipt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// At most; the buyer stops once the backup is done.
const PURCHASES: usize = 2_000;
const TOPPED_UP: i64 = 10_000_000;

/// Distinct amounts, so a balance names the prefix of purchases it holds.
fn amount(i: usize) -> i64 {
    100 + i as i64
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn a_backup_taken_under_purchases_restores_into_a_fresh_data_dir() {
    let (env, issuer) = wallet_env(None, "");
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let b = env.broker();
    let (_, p2) = pw("alice");
    let mut t = released(&b, &alice, "alice");
    let v = voucher(&env, &issuer, "alice", TOPPED_UP, "v1");
    t.top_up(&v, p2.as_bytes()).unwrap();

    // Purchases one after another, until the backup is done; each
    // acknowledged one is recorded with its decision id.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let buyer = {
        let (acked, count, stop) = (acked.clone(), count.clone(), stop.clone());
        std::thread::spawn(move || {
            for i in 0..PURCHASES {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (_, receipt) = t
                    .purchase("m1", amount(i), "EUR", &format!("o{i}"), &format!("k{i}"))
                    .expect("purchase");
                let id = SignedReceipt::decode(&receipt).unwrap().receipt.decision_id;
                acked.lock().unwrap().push(id);
                count.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    wait_until("20 purchases", TIMEOUT, || {
        count.load(Ordering::SeqCst) >= 20
    });
    let backup = env.dir.path().join("backup");
    let before = count.load(Ordering::SeqCst);
    let out = env.kb(&["backup", path_str(&backup)]).success();
    let after = count.load(Ordering::SeqCst);
    assert!(
        out.stdout().contains("ledger.db (ledger"),
        "{}",
        out.stdout()
    );
    // A few more after it, so it ran while purchases did.
    wait_until("purchases after the backup", TIMEOUT, || {
        count.load(Ordering::SeqCst) >= after + 3
    });
    stop.store(true, Ordering::SeqCst);
    buyer.join().unwrap();
    assert!(after < PURCHASES, "the buyer was still buying");

    // Not under a running broker, and not into a used directory.
    let refused = env.kb(&["restore", path_str(&backup), "--reason", "test"]);
    assert!(!refused.0.status.success());
    assert!(
        refused.stderr().contains("a broker runs on"),
        "{}",
        refused.stderr()
    );
    let again = env.kb(&["backup", path_str(&backup)]);
    assert!(!again.0.status.success());
    assert!(
        again.stderr().contains("is not empty"),
        "{}",
        again.stderr()
    );
    drop(b);

    // A fresh data directory: the token from its own backup (the HSM
    // procedure of docs/OPERATIONS.md: a copy of hsm/ with the PINs),
    // then `keybroker restore` of the databases.
    let fresh = tempfile::tempdir().unwrap();
    let data = fresh.path().join("var");
    let old = env.dir.path().join("var");
    copy_dir(&old.join("hsm"), &data.join("hsm"));
    let conf = data.join("hsm/softhsm2.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text.replace(path_str(&old), path_str(&data))).unwrap();
    let config = fresh.path().join("keybroker.toml");
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&config, text.replace(path_str(&old), path_str(&data))).unwrap();
    let env2 = Env {
        dir: fresh,
        config,
        bin: env.bin.clone(),
    };
    // A backup that does not match its manifest is refused whole.
    let damaged = env.dir.path().join("damaged");
    copy_dir(&backup, &damaged);
    let mut db = std::fs::read(damaged.join("ledger.db")).unwrap();
    let n = db.len();
    db[n / 2] ^= 1;
    std::fs::write(damaged.join("ledger.db"), db).unwrap();
    let bad = env2.kb(&["restore", path_str(&damaged), "--reason", "test"]);
    assert!(!bad.0.status.success());
    assert!(
        bad.stderr().contains("does not match the manifest"),
        "{}",
        bad.stderr()
    );
    assert!(!data.join("ledger.db").exists(), "nothing was put back");

    let out = env2
        .kb(&["restore", path_str(&backup), "--reason", "disk lost: test"])
        .success();
    assert!(
        out.stdout().contains("restore recorded"),
        "{}",
        out.stdout()
    );
    assert!(out.stdout().contains("check ok"), "{}", out.stdout());
    env2.kb(&["wallet", "audit"]).success();

    // The balance names how many purchases the copy holds: at least every
    // one acknowledged before the backup began, at most those acknowledged
    // by its end and the one in flight.
    let b2 = env2.broker();
    let mut t = released(&b2, &alice, "alice");
    let balance = t.balance().unwrap();
    let eur = balance.iter().find(|(c, _)| c == "EUR").unwrap().1;
    let held = (0..=PURCHASES)
        .find(|&n| TOPPED_UP - (0..n).map(amount).sum::<i64>() == eur)
        .unwrap_or_else(|| panic!("balance {eur} is no prefix of the purchases"));
    eprintln!(
        "the copy holds {held} purchases: {before} acknowledged before it, {after} by its end"
    );
    assert!(
        (before..=after + 1).contains(&held),
        "the copy holds {held} purchases; {before} were acknowledged before it, {after} after"
    );
    // Each one held is the acknowledged decision: its retry returns it.
    let acked = acked.lock().unwrap();
    for (i, id) in acked.iter().enumerate().take(held) {
        let (_, receipt) = t
            .purchase("m1", amount(i), "EUR", &format!("o{i}"), &format!("k{i}"))
            .unwrap();
        assert_eq!(
            &SignedReceipt::decode(&receipt).unwrap().receipt.decision_id,
            id
        );
    }
    assert_eq!(t.balance().unwrap(), balance, "the retries debited nothing");
    // The restored ledger takes new entries, and the audit stays clean.
    t.purchase("m1", 1, "EUR", "after", "k-after").unwrap();
    drop(b2);
    env2.kb(&["wallet", "audit"]).success();
}
