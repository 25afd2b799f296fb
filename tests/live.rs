//! Registry changes on a running broker (issue 21): a market added or
//! removed takes effect within a second, without a restart, and SIGHUP
//! re-reads the registry and applies the config file's live settings
//! without stopping anything, and refuses a bad file.

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use std::time::{Duration, Instant};

#[test]
fn markets_added_and_removed_apply_live() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    assert_eq!(refused(t.exchange("m1")), ErrorCode::UnknownMarket);

    // `market add` (inside env.market) on the running broker's registry.
    let _m = env.market("m1", "*");
    let added = Instant::now();
    let mut t = released(&b, &alice, "alice");
    loop {
        match t.exchange("m1") {
            Ok(_) => break,
            Err(e) => assert!(
                added.elapsed() < Duration::from_secs(5),
                "no exchange 5 s after market add: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = added.elapsed();
    eprintln!("market add to first exchange: {took:?}");
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    wait_until(
        "both cores dial the new market",
        Duration::from_secs(2),
        || metric(b.admin, "keybroker_market_up{market=\"m1\"}") == 2.0,
    );

    env.kb(&["market", "remove", "m1"]).success();
    let removed = Instant::now();
    wait_until(
        "unknown_market after remove",
        Duration::from_secs(5),
        || matches!(t.exchange("m1"), Err(e) if e.code() == Some(ErrorCode::UnknownMarket)),
    );
    let took = removed.elapsed();
    eprintln!("market remove to refusal: {took:?}");
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    wait_until("market_up 0 after remove", Duration::from_secs(5), || {
        metric(b.admin, "keybroker_market_up{market=\"m1\"}") == 0.0
    });
}

#[test]
fn sighup_rereads_and_refuses_a_bad_config_without_stopping() {
    let env = Env::new("");
    let alice = env.user("alice");
    let log = env.dir.path().join("broker.log");
    let b = env.broker_logging(Some(&log));
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &b.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let log_has = |what: &str| std::fs::read_to_string(&log).unwrap().contains(what);

    hup();
    wait_until("the reload line", TIMEOUT, || {
        log_has("SIGHUP: registries re-read; the config file is unchanged")
    });
    released(&b, &alice, "alice")
        .ping()
        .expect("serving after SIGHUP");

    // A changed but valid file: its live settings take effect at once, the
    // rest are named for the next restart, and the broker runs on.
    // Before: one wrong password of three allowed does not lock bob.
    let bob = env.user("bob");
    let (bob_p1, _) = pw("bob");
    let login = |p: &str| b.connect(&bob).login("bob", p.as_bytes());
    assert_eq!(refused(login("wrong")), ErrorCode::WrongPassword);
    login(&bob_p1).expect("one failure of three does not lock");
    let good = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        good.replace("max_failures = 3", "max_failures = 1")
            .replace("cores = 2", "cores = 1"),
    )
    .unwrap();
    hup();
    wait_until("the reload's lines", TIMEOUT, || {
        log_has("the live settings of these sections are in force sections=auth")
    });
    assert!(
        log_has("take effect at the next restart sections=broker"),
        "cores waits for a restart"
    );
    // After: auth.max_failures = 1 is in force.
    let _ = login("wrong");
    assert_eq!(refused(login(&bob_p1)), ErrorCode::Locked);
    // A file that does not parse: refused, with the reason, and the broker
    // keeps its running config.
    std::fs::write(
        &env.config,
        format!("{good}\n[broker]\nno_such_setting = 1\n"),
    )
    .unwrap();
    hup();
    wait_until("the refusal", TIMEOUT, || {
        log_has("SIGHUP: the config file is refused; the running config stays")
    });
    released(&b, &alice, "alice")
        .ping()
        .expect("serving after a bad SIGHUP");
    assert!(b.child.id() > 0);
    std::fs::write(&env.config, good).unwrap();
}

#[test]
fn status_says_healthy_and_names_what_is_not() {
    // Pings every 0.3 s, so a dead market is seen quickly.
    let env = Env::new("[exchange]\nkeepalive_ms = 300\nmarket_timeout_ms = 1000\n");
    let b = env.broker();
    let m = env.market("m1", "*");
    let admin = b.admin.to_string();
    let status = || env.cmd(&["status", "--admin", &admin]).output().unwrap();
    wait_until("market_up 2", Duration::from_secs(5), || {
        metric(b.admin, "keybroker_market_up{market=\"m1\"}") == 2.0
    });
    let ok = status();
    let text = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(ok.status.success(), "{text}");
    for line in [
        "hsm            up",
        "market m1       up, 2/2 cores",
        "status: healthy",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    drop(m);
    wait_until("market_up 0", Duration::from_secs(5), || {
        metric(b.admin, "keybroker_market_up{market=\"m1\"}") == 0.0
    });
    let down = status();
    let text = String::from_utf8_lossy(&down.stdout).into_owned();
    assert_eq!(down.status.code(), Some(1), "{text}");
    assert!(text.contains("UNHEALTHY: market m1 is down"), "{text}");
    drop(b);
    let gone = status();
    let text = String::from_utf8_lossy(&gone.stdout).into_owned();
    assert_eq!(gone.status.code(), Some(1), "{text}");
    assert!(text.contains("does not answer"), "{text}");
}
