//! An attacker who can write the registry file but not use the HSM (a
//! database administrator, an SQL injection, a copy of the data dir
//! without the token's PIN): real binary, SoftHSM token, and the
//! broker's own `keybroker.db` edited with SQLite while the broker is
//! stopped and while it runs. Nothing they write is accepted; each
//! refusal is logged, and `keybroker check` names every row.

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use rusqlite::{Connection, params};
use std::path::PathBuf;

fn db(env: &Env) -> Connection {
    Connection::open(env.data().join("keybroker.db")).unwrap()
}

/// `keybroker check`: whether it passed, and its report.
fn check(env: &Env) -> (bool, String) {
    let out = env.kb(&["check"]);
    (out.0.status.success(), out.stdout())
}

/// The fingerprint of the terminal enrolled into directory `name`.
fn fingerprint(env: &Env, name: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(env.terminal_dir(name).join("terminal.crt")).unwrap();
    keybroker::pki::fingerprint(&keybroker::pki::read_cert_pem(&pem).unwrap()).to_vec()
}

fn login(b: &Broker, tc: &keybroker::terminal::TerminalConfig, user: &str, pw: &str) -> ErrorCode {
    refused(b.connect(tc).login(user, pw.as_bytes()))
}

/// A broker whose log is kept, and the log's path.
fn logged(env: &Env, name: &str) -> (Broker, PathBuf) {
    let log = env.dir.path().join(format!("{name}.log"));
    (env.broker_logging(Some(&log)), log)
}

/// Waits until the broker's log has an audit line refusing `row`.
fn refusal_logged(log: &PathBuf, row: &str) {
    let (table, key) = row.split_once('/').unwrap();
    let want = format!("table=\"{table}\" key={key}");
    wait_until(&format!("the audit line for {row}"), TIMEOUT, || {
        std::fs::read_to_string(log).is_ok_and(|l| {
            l.lines().any(|l| {
                l.contains("audit") && l.contains("registry row refused") && l.contains(&want)
            })
        })
    });
}

#[test]
fn known_password_hashes_in_a_users_row_open_nothing() {
    let env = Env::new("");
    let alice = env.user("alice");
    let bob = env.user("bob");
    assert!(check(&env).0, "a fresh registry passes");
    let (b, log) = logged(&env, "running");
    released(&b, &bob, "bob").logout().unwrap();
    // Bob's hashes replaced by hashes of passwords the attacker knows, in
    // the form a row from before the binding has (a PHC hash for each).
    let known = |pw: &str| keybroker::passwords::hash(pw.as_bytes(), 64, 1).unwrap();
    db(&env)
        .execute(
            "UPDATE users SET pw_access = ?1, pw_release = ?2 WHERE id = 'bob'",
            params![known("known-1"), known("known-2")],
        )
        .unwrap();
    // While the broker runs, and after it starts again.
    assert_eq!(login(&b, &bob, "bob", "known-1"), ErrorCode::Locked);
    refusal_logged(&log, "users/bob");
    drop(b);
    let (b, log) = logged(&env, "restarted");
    assert_eq!(login(&b, &bob, "bob", "known-1"), ErrorCode::Locked);
    let (p1, _) = pw("bob");
    assert_eq!(
        login(&b, &bob, "bob", &p1),
        ErrorCode::Locked,
        "nor the real one"
    );
    refusal_logged(&log, "users/bob");
    // Nothing else is touched.
    released(&b, &alice, "alice").logout().unwrap();
    let (ok, report) = check(&env);
    assert!(!ok);
    assert!(
        report.contains("bad users/bob: fails its MAC check"),
        "{report}"
    );
    assert!(report.contains("check failed: 1 of "), "{report}");
}

#[test]
fn remapped_unrevoked_and_swapped_rows_are_refused() {
    let env = Env::new("");
    let alice = env.user("alice");
    let old = env.terminal("alice", "alice-old");
    let bob = env.user("bob");
    let mallory = env.user("mallory");
    let serial = env
        .kb(&["terminal", "list", "--user", "alice"])
        .success()
        .stdout();
    let old_fp = hex::encode(fingerprint(&env, "alice-old"));
    let old_serial = serial
        .lines()
        .find(|l| l.ends_with(&old_fp))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_owned();
    env.kb(&["terminal", "revoke", &old_serial]).success();
    let (p_alice, _) = pw("alice");
    let (p_bob, _) = pw("bob");
    let (b, log) = logged(&env, "running");
    released(&b, &bob, "bob").logout().unwrap();

    let sql = db(&env);
    // Mallory's terminal remapped to bob, alice's old terminal un-revoked,
    // alice's and bob's wrapped keys swapped (with their MACs, too).
    sql.execute(
        "UPDATE terminals SET user_id = 'bob' WHERE fingerprint = ?1",
        [fingerprint(&env, "mallory")],
    )
    .unwrap();
    sql.execute(
        "UPDATE terminals SET revoked = 0 WHERE fingerprint = ?1",
        [fingerprint(&env, "alice-old")],
    )
    .unwrap();
    sql.execute_batch(
        "CREATE TEMP TABLE k AS SELECT id, wrapped_key, mac FROM users;
         UPDATE users SET (wrapped_key, mac) = (SELECT wrapped_key, mac FROM k
             WHERE k.id = CASE users.id WHEN 'alice' THEN 'bob' ELSE 'alice' END)
             WHERE id IN ('alice', 'bob');",
    )
    .unwrap();

    let refusals = |b: &Broker| {
        assert_eq!(
            login(b, &mallory, "bob", &p_bob),
            ErrorCode::TerminalRevoked
        );
        assert_eq!(
            login(b, &old, "alice", &p_alice),
            ErrorCode::TerminalRevoked
        );
        assert_eq!(login(b, &bob, "bob", &p_bob), ErrorCode::Locked);
        assert_eq!(login(b, &alice, "alice", &p_alice), ErrorCode::Locked);
    };
    refusals(&b);
    refusal_logged(
        &log,
        &format!("terminals/{}", hex::encode(fingerprint(&env, "mallory"))),
    );
    refusal_logged(&log, &format!("terminals/{old_fp}"));
    refusal_logged(&log, "users/alice");
    drop(b);
    let (b, _) = logged(&env, "restarted");
    refusals(&b);

    let (ok, report) = check(&env);
    assert!(!ok);
    for row in [
        "users/alice".to_owned(),
        "users/bob".into(),
        format!("terminals/{}", hex::encode(fingerprint(&env, "mallory"))),
        format!("terminals/{old_fp}"),
    ] {
        assert!(
            report.contains(&format!("bad {row}: fails its MAC check")),
            "{row}: {report}"
        );
    }
    assert!(report.contains("check failed: 4 of "), "{report}");
    // The operator's way out: the bad rows go (mallory's terminal, bob's
    // now, with him), and `check` passes again.
    env.kb(&["user", "remove", "alice"]).success();
    env.kb(&["user", "remove", "bob"]).success();
    let (ok, report) = check(&env);
    assert!(ok, "{report}");
}

#[test]
fn a_reset_lock_counter_is_detected() {
    let env = Env::new("");
    let alice = env.user("alice");
    let bob = env.user("bob");
    let (p_alice, _) = pw("alice");
    let (p_bob, _) = pw("bob");
    {
        let b = env.broker();
        assert_eq!(login(&b, &alice, "alice", "bad1"), ErrorCode::WrongPassword);
        assert_eq!(login(&b, &alice, "alice", "bad2"), ErrorCode::WrongPassword);
        assert_eq!(login(&b, &alice, "alice", "bad3"), ErrorCode::Locked);
    }
    // Broker stopped: the lock and the counter cleared by hand.
    db(&env)
        .execute(
            "UPDATE users SET failures = 0, locked = 0 WHERE id = 'alice'",
            [],
        )
        .unwrap();
    let (b, log) = logged(&env, "restarted");
    assert_eq!(login(&b, &alice, "alice", &p_alice), ErrorCode::Locked);
    refusal_logged(&log, "users/alice");
    let (ok, report) = check(&env);
    assert!(!ok && report.contains("bad users/alice"), "{report}");

    // While it runs: bob's row as it was before two failures, MAC and
    // all, put back. The MAC is genuine; the running broker has seen a
    // newer generation of the row and refuses it.
    let sql = db(&env);
    let snapshot = "SELECT failures, locked, generation, mac FROM users WHERE id = 'bob'";
    let before: (i64, i64, i64, Vec<u8>) = sql
        .query_row(snapshot, [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap();
    assert_eq!(login(&b, &bob, "bob", "bad1"), ErrorCode::WrongPassword);
    assert_eq!(login(&b, &bob, "bob", "bad2"), ErrorCode::WrongPassword);
    sql.execute(
        "UPDATE users SET failures = ?1, locked = ?2, generation = ?3, mac = ?4 WHERE id = 'bob'",
        params![before.0, before.1, before.2, before.3],
    )
    .unwrap();
    assert_eq!(login(&b, &bob, "bob", &p_bob), ErrorCode::Locked);
    wait_until("the rollback named in the log", TIMEOUT, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("is older (generation"))
    });
    // The window docs/SECURITY.md states: a broker started after the
    // rollback has seen nothing newer, and `check` cannot tell either.
    drop(b);
    let b = env.broker();
    b.connect(&bob).login("bob", p_bob.as_bytes()).unwrap();
    assert!(!check(&env).1.contains("users/bob"));
}

#[test]
fn a_market_row_redirected_or_given_another_ca_is_left_out() {
    let env = Env::new("");
    let alice = env.user("alice");
    let _m = env.market("m1", "alice");
    let (b, log) = logged(&env, "running");
    let mut t = released(&b, &alice, "alice");
    t.exchange("m1").unwrap();
    // The market's endpoint pointed elsewhere (its CA could be swapped the
    // same way): the running broker's markets watcher drops it.
    db(&env)
        .execute(
            "UPDATE markets SET endpoint = '127.0.0.1:9' WHERE id = 'm1'",
            [],
        )
        .unwrap();
    wait_until("the market left out", TIMEOUT, || {
        t.exchange("m1").err().and_then(|e| e.code()) == Some(ErrorCode::UnknownMarket)
    });
    wait_until("its audit line", TIMEOUT, || {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("market row refused") && l.contains("key=m1"))
    });
    let (ok, report) = check(&env);
    assert!(
        !ok && report.contains("bad markets/m1: fails its MAC check"),
        "{report}"
    );
}
