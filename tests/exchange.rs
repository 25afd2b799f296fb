//! Brokered key exchange end to end: real broker and market binaries,
//! SoftHSM, loopback sockets. The direct channel succeeding is the proof
//! that terminal and market hold the same X (AES-GCM would refuse otherwise).

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use keybroker::terminal::{Brokered, Direct, TerminalError};
use std::time::{Duration, Instant};

fn direct_round_trip(b: &Brokered, who: &str) {
    let mut d = Direct::connect(b, TIMEOUT).expect("direct channel");
    for i in 0..3 {
        let req = format!("order {i}");
        let answer = d.request(req.as_bytes()).expect("direct request");
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.contains(&format!("to {who}: {req}")), "{answer}");
    }
}

fn brokered_in_mode(config: &str) {
    let env = Env::new(config);
    let alice = env.user("alice");
    let _m = env.market("m1", "alice");
    let log = env.dir.path().join("broker.log");
    let b = env.broker_logging(Some(&log));
    let mut t = released(&b, &alice, "alice");
    let mut keys = Vec::new();
    for _ in 0..3 {
        let full = t.exchange("m1").expect("full exchange");
        direct_round_trip(&full, "alice");
        keys.push(hex::encode(*full.x));
        let partial = t.exchange_partial("m1").expect("partial exchange");
        direct_round_trip(&partial, "alice");
        keys.push(hex::encode(*partial.x));
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 6, "every exchange must agree a fresh X");
    t.logout().unwrap();
    // SIGTERM writes out the lines still queued (they are batched in time).
    let status = b.stop();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(15),
        "a SIGTERM stop ends by the signal (what systemd counts as clean): {status:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("audit: exchange").count(),
        6,
        "an exchange's audit line is missing from the log:\n{text}"
    );
    // Each session line names the terminal's address, plain, as an
    // operator greps for it.
    let session_lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            ["audit: login", "audit: released", "audit: exchange"]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    assert!(session_lines.len() > 6, "{text}");
    for l in session_lines {
        assert!(l.contains(" peer=127.0.0.1:"), "no plain peer address: {l}");
    }
    assert!(text.contains("stopping"), "the stop is not logged");
    for k in &keys {
        assert!(
            !text.to_lowercase().contains(k),
            "X appears in the broker log"
        );
    }
}

#[test]
fn full_and_partial_exchange_with_software_kx() {
    brokered_in_mode("[exchange]\nkx = \"software\"\n");
}

#[test]
fn full_and_partial_exchange_with_hsm_kx() {
    brokered_in_mode("[exchange]\nkx = \"hsm\"\n");
}

#[test]
fn exchange_with_hsm_calls_inline_on_the_cores() {
    brokered_in_mode("[exchange]\nkx = \"hsm\"\n[hsm]\ndispatch = \"inline\"\n");
}

#[test]
fn exchange_refusals_are_typed() {
    let env = Env::new("");
    let alice = env.user("alice");
    let bob = env.user("bob");
    let _m = env.market("m1", "alice");
    let b = env.broker();
    // Not released.
    let mut t = b.connect(&alice);
    let (p1, _) = pw("alice");
    t.login("alice", p1.as_bytes()).unwrap();
    assert_eq!(refused(t.exchange("m1")), ErrorCode::NotReleased);
    // Unknown market, user not allowed there.
    let mut t = released(&b, &alice, "alice");
    assert_eq!(refused(t.exchange("nowhere")), ErrorCode::UnknownMarket);
    let mut tb = released(&b, &bob, "bob");
    assert_eq!(refused(tb.exchange("m1")), ErrorCode::UserNotAllowed);
    assert_eq!(
        refused(tb.exchange_partial("m1")),
        ErrorCode::UserNotAllowed
    );
    // Alice is unaffected.
    t.exchange("m1").unwrap();
}

#[test]
fn a_users_sessions_share_one_released_key_and_each_proves_the_password() {
    let env = Env::new("");
    let alice = env.user("alice");
    let second = env.terminal("alice", "alice-2");
    let _m = env.market("m1", "alice");
    let b = env.broker();
    let mut first = released(&b, &alice, "alice");
    first.exchange("m1").unwrap();
    // The key is released already, yet a session must still prove the
    // second password to use it.
    let mut t = b.connect(&second);
    t.login("alice", pw("alice").0.as_bytes()).unwrap();
    assert_eq!(refused(t.release(b"guess")), ErrorCode::WrongPassword);
    assert_eq!(refused(t.exchange("m1")), ErrorCode::NotReleased);
    t.release(pw("alice").1.as_bytes()).unwrap();
    t.exchange("m1").unwrap();
    assert_eq!(unwraps(&b), 1.0);
    // One session ending does not take the key from the other.
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    t.exchange("m1").unwrap();
    drop(t);
    std::thread::sleep(Duration::from_millis(200));
    // After the last session the key lingers (hsm.key_linger_s): a terminal
    // that reconnects proves both passwords again but skips the unwrap.
    let mut t = b.connect(&alice);
    t.login("alice", pw("alice").0.as_bytes()).unwrap();
    assert_eq!(refused(t.exchange("m1")), ErrorCode::NotReleased);
    t.release(pw("alice").1.as_bytes()).unwrap();
    t.exchange("m1").unwrap();
    assert_eq!(unwraps(&b), 1.0);
}

#[test]
fn without_a_linger_the_key_goes_with_the_last_session() {
    assert_eq!(unwraps_across(0, Duration::from_millis(200)), 2.0);
}

#[test]
fn a_lingering_key_goes_when_the_linger_has_passed() {
    // The linger (1 s) plus a sweep (every second at the least).
    assert_eq!(unwraps_across(1, Duration::from_millis(2500)), 2.0);
}

/// Unwraps for two sessions of one user, `pause` apart, on a broker with
/// `hsm.key_linger_s = linger_s`.
fn unwraps_across(linger_s: u64, pause: Duration) -> f64 {
    let env = Env::new(&format!("[hsm]\nkey_linger_s = {linger_s}"));
    let alice = env.user("alice");
    let _m = env.market("m1", "alice");
    let b = env.broker();
    released(&b, &alice, "alice").exchange("m1").unwrap();
    std::thread::sleep(pause);
    released(&b, &alice, "alice").exchange("m1").unwrap();
    unwraps(&b)
}

/// Home-card keys the broker has unwrapped in the HSM, from `/metrics`.
fn unwraps(b: &Broker) -> f64 {
    metric(
        b.admin,
        "keybroker_hsm_operation_duration_seconds_count{op=\"unwrap\"}",
    )
}

#[test]
fn market_killed_mid_batch_fails_exactly_the_pending_and_recovers() {
    let env = Env::new("[exchange]\nmarket_timeout_ms = 20000\nreconnect_max_ms = 200\n");
    const N: usize = 6;
    let users: Vec<String> = (0..N).map(|i| format!("u{i}")).collect();
    let tcs: Vec<_> = users.iter().map(|u| env.user(u)).collect();
    let m = env.market("m1", "*");
    let b = env.broker();
    let mut terms: Vec<_> = users
        .iter()
        .zip(&tcs)
        .map(|(u, tc)| released(&b, tc, u))
        .collect();
    for t in terms.iter_mut() {
        t.exchange("m1").expect("warm-up exchange");
    }
    // Freeze the market so the next batch is certainly in flight, then kill it.
    m.signal("-STOP");
    let handles: Vec<_> = terms
        .into_iter()
        .map(|mut t| {
            std::thread::spawn(move || {
                let r = t.exchange("m1").map(|_| ());
                (t, r)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    m.signal("-KILL");
    let mut terms = Vec::new();
    for h in handles {
        let (t, r) = h.join().unwrap();
        match r {
            Err(TerminalError::Refused { code, .. }) => assert!(
                matches!(
                    code,
                    ErrorCode::MarketUnavailable | ErrorCode::MarketTimeout
                ),
                "pending exchange failed with {code}"
            ),
            other => panic!("pending exchange did not fail typed: {other:?}"),
        }
        terms.push(t);
    }
    // While the market is down, exchanges fail fast.
    let started = Instant::now();
    assert_eq!(
        refused(terms[0].exchange("m1")),
        ErrorCode::MarketUnavailable
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // Bring it back on the same ports; exchanges succeed again.
    let config = m.config.clone();
    drop(m);
    let _m2 = env.start_market(&config);
    let deadline = Instant::now() + Duration::from_secs(10);
    for (t, u) in terms.iter_mut().zip(&users) {
        loop {
            match t.exchange("m1") {
                Ok(b) => {
                    direct_round_trip(&b, u);
                    break;
                }
                Err(e)
                    if e.code() == Some(ErrorCode::MarketUnavailable)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("exchange after restart: {e}"),
            }
        }
    }
}

#[test]
fn cli_exchange_in_both_modes_answers_on_the_direct_channel() {
    let env = Env::new("");
    env.user("alice");
    let _m = env.market("m1", "alice");
    let b = env.broker();
    for partial in [false, true] {
        let mut args = vec!["--market", "m1", "--request", "cli order"];
        if partial {
            args.push("--partial");
        }
        let out = env.terminal_cli(&b, "alice", "exchange", &args).success();
        assert!(
            out.stdout().contains("market answered") && out.stdout().contains("cli order"),
            "{}",
            out.stdout()
        );
    }
}

#[test]
fn an_idle_market_link_stays_up_and_a_dead_market_is_seen_without_an_exchange() {
    let env = Env::new(
        "[exchange]\nkeepalive_ms = 300\nmarket_timeout_ms = 1000\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n",
    );
    let alice = env.user("alice");
    // The market closes a channel silent for 1 s; the broker pings every 0.3 s.
    let m = env.market_with("m1", "*", "idle_timeout_ms = 1000\n", None);
    let b = env.broker();
    let up = || metric(b.admin, "keybroker_market_up{market=\"m1\"}");
    let mut t = released(&b, &alice, "alice");
    t.exchange("m1").expect("first exchange");
    // Idle for twice the market's idle timeout (under the access channel's
    // 3 s): the link is still up and the next exchange succeeds first time.
    std::thread::sleep(Duration::from_millis(2_000));
    assert_eq!(up(), 2.0, "both cores' links stay up while idle");
    t.exchange("m1").expect("the exchange after an idle spell");

    // The market dies: market_up falls to 0 within a keepalive interval and
    // a timeout, with no exchange to notice it.
    let config = m.config.clone();
    drop(m);
    let t0 = Instant::now();
    wait_until("market_up 0", Duration::from_secs(5), || up() == 0.0);
    assert!(
        t0.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        refused(released(&b, &alice, "alice").exchange("m1")),
        ErrorCode::MarketUnavailable
    );
    // Back on the same ports: the broker redials by itself.
    let _m = env.start_market(&config);
    wait_until("market_up 2", Duration::from_secs(5), || up() == 2.0);
    released(&b, &alice, "alice")
        .exchange("m1")
        .expect("an exchange after the market came back");
}

#[test]
fn an_exchange_whose_market_channel_broke_unseen_is_asked_again_on_the_next() {
    // Keepalive too slow to see the market's 1 s idle close: the next
    // exchange finds the channel broken when it sends.
    let env = Env::new(
        "[exchange]\nkeepalive_ms = 600000\nmarket_timeout_ms = 10000\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n",
    );
    let alice = env.user("alice");
    let m = env.market_with("m1", "*", "idle_timeout_ms = 1000\n", None);
    let b = env.broker();
    let retried = || metric(b.admin, "keybroker_exchange_retried_total{market=\"m1\"}");
    let mut t = released(&b, &alice, "alice");
    t.exchange("m1").expect("first exchange");
    assert_eq!(retried(), 0.0);
    std::thread::sleep(Duration::from_millis(2_000));
    t.exchange("m1")
        .expect("the exchange after the market closed the idle channel");
    assert_eq!(retried(), 1.0, "asked once more, on a new channel");

    // Again, but the market is gone: the redial fails and the terminal is
    // told market_unavailable then, not after market_timeout_ms (10 s).
    std::thread::sleep(Duration::from_millis(2_000));
    drop(m);
    let t0 = Instant::now();
    assert_eq!(refused(t.exchange("m1")), ErrorCode::MarketUnavailable);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(retried(), 2.0);
}

#[test]
fn the_market_audits_the_exchanges_it_refuses() {
    let env = Env::new("");
    let alice = env.user("alice");
    let log = env.dir.path().join("market.log");
    let _m = env.market_with("m1", "bob", "", Some(&log));
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    assert_eq!(refused(t.exchange("m1")), ErrorCode::UserNotAllowed);
    wait_until("the market's audit line", TIMEOUT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().any(|l| {
            l.contains("audit: market refused exchange")
                && l.contains("broker=127.0.0.1:")
                && l.contains("user=alice")
                && l.contains("code=\"user_not_allowed\"")
        })
    });
}
