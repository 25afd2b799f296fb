//! Every refusal a terminal is sent is an audit line naming the peer, the
//! terminal (fingerprint and serial), the user and the code
//! (docs/OPERATIONS.md, "Refusals"). Real sockets, a real SoftHSM token and
//! registry, the real binary's log.

mod common;

use common::*;
use keybroker::proto::ErrorCode;

/// (serial, fingerprint) of the one terminal `terminal list --user` shows.
fn terminal_of(env: &Env, user: &str) -> (String, String) {
    let list = env
        .kb(&["terminal", "list", "--user", user])
        .success()
        .stdout();
    let cols: Vec<&str> = list.lines().next().unwrap().split('\t').collect();
    (cols[0].to_owned(), cols[3].to_owned())
}

#[test]
fn every_refusal_is_an_audit_line_with_peer_terminal_user_and_code() {
    let env = Env::new("");
    let alice = env.user("alice");
    let bob = env.user("bob");
    let carol = env.user("carol");
    let (a_serial, a_fp) = terminal_of(&env, "alice");
    let (b_serial, b_fp) = terminal_of(&env, "bob");
    let (c_serial, c_fp) = terminal_of(&env, "carol");
    // Bob's terminal is revoked before the broker starts.
    env.kb(&["terminal", "revoke", &b_serial]).success();
    // m1 lets only carol trade.
    let _m1 = env.market("m1", "carol");
    let log = env.dir.path().join("broker.log");
    let b = env.broker_with(Some((&log, "info")), None);
    let (a1, a2) = pw("alice");

    // (code, user, serial, fingerprint) of each refusal provoked below.
    let mut expected: Vec<(ErrorCode, &str, &str, &str)> = Vec::new();
    let mut t = b.connect(&alice);
    assert_eq!(refused(t.exchange("m1")), ErrorCode::NotLoggedIn);
    expected.push((ErrorCode::NotLoggedIn, "-", &a_serial, &a_fp));
    assert_eq!(
        refused(t.login("nobody", b"whatever-pw")),
        ErrorCode::UnknownUser
    );
    expected.push((ErrorCode::UnknownUser, "nobody", &a_serial, &a_fp));
    assert_eq!(
        refused(t.login("alice", b"not-alices-pw")),
        ErrorCode::WrongPassword
    );
    expected.push((ErrorCode::WrongPassword, "alice", &a_serial, &a_fp));
    t.login("alice", a1.as_bytes()).unwrap();
    assert_eq!(refused(t.exchange("m1")), ErrorCode::NotReleased);
    expected.push((ErrorCode::NotReleased, "alice", &a_serial, &a_fp));
    t.release(a2.as_bytes()).unwrap();
    assert_eq!(refused(t.exchange("nowhere")), ErrorCode::UnknownMarket);
    expected.push((ErrorCode::UnknownMarket, "alice", &a_serial, &a_fp));
    assert_eq!(refused(t.exchange("m1")), ErrorCode::UserNotAllowed);
    expected.push((ErrorCode::UserNotAllowed, "alice", &a_serial, &a_fp));
    assert_eq!(
        refused(t.purchase("m1", 0, "EUR", "o", "k0")),
        ErrorCode::InvalidAmount
    );
    expected.push((ErrorCode::InvalidAmount, "alice", &a_serial, &a_fp));

    // Another user's terminal, then a revoked one: both close.
    let mut t = b.connect(&carol);
    assert_eq!(
        refused(t.login("alice", a1.as_bytes())),
        ErrorCode::WrongTerminal
    );
    expected.push((ErrorCode::WrongTerminal, "alice", &c_serial, &c_fp));
    let (b1, _) = pw("bob");
    let mut t = b.connect(&bob);
    assert_eq!(
        refused(t.login("bob", b1.as_bytes())),
        ErrorCode::TerminalRevoked
    );
    expected.push((ErrorCode::TerminalRevoked, "bob", &b_serial, &b_fp));

    // Three wrong passwords lock carol's card (max_failures = 3).
    let mut t = b.connect(&carol);
    for _ in 0..2 {
        assert_eq!(
            refused(t.login("carol", b"not-carols-pw")),
            ErrorCode::WrongPassword
        );
    }
    assert_eq!(
        refused(t.login("carol", b"not-carols-pw")),
        ErrorCode::Locked
    );
    expected.push((ErrorCode::Locked, "carol", &c_serial, &c_fp));

    // A frame the broker cannot parse: `malformed`, before any login.
    let mut t = b.connect(&carol);
    t.send_raw(&[0, 0, 0, 1, 0xEE]).unwrap();
    let _ = t.recv();
    expected.push((ErrorCode::Malformed, "-", &c_serial, &c_fp));

    drop(t);
    b.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("audit: refused"))
        .collect();
    for (code, user, serial, fp) in &expected {
        let want = [
            " peer=127.0.0.1:".to_owned(),
            format!(" terminal={fp} "),
            format!(" serial={serial} "),
            format!(" user={user} "),
            format!(" code={} ", code.name()),
        ];
        assert!(
            refusals
                .iter()
                .any(|l| want.iter().all(|w| l.contains(w.as_str()))),
            "no audit line for {code} of user {user}: want {want:?} in\n{}",
            refusals.join("\n")
        );
    }
    // One line a refusal: the two wrong passwords of carol and alice's one.
    let wrong = refusals
        .iter()
        .filter(|l| l.contains(" code=wrong_password "))
        .count();
    assert_eq!(wrong, 3, "{}", refusals.join("\n"));
}

/// A refusal that costs the terminal nothing (`not_logged_in` here) is
/// throttled to one line a second per source and code, each with the count
/// held back; the counter still counts every one.
#[test]
fn free_refusals_are_throttled_and_counted() {
    let env = Env::new("");
    let alice = env.user("alice");
    let log = env.dir.path().join("broker.log");
    let b = env.broker_with(Some((&log, "info")), None);
    let mut t = b.connect(&alice);
    let started = std::time::Instant::now();
    const N: usize = 200;
    for _ in 0..N {
        assert_eq!(refused(t.exchange("m1")), ErrorCode::NotLoggedIn);
    }
    let elapsed = started.elapsed();
    let counted = metric(b.admin, "keybroker_errors_total{code=\"not_logged_in\"}");
    assert_eq!(counted as usize, N);
    drop(t);
    b.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("audit: refused") && l.contains(" code=not_logged_in "))
        .collect();
    // One a second at most (two cores: one throttle each), at least the first.
    let bound = 2 * (elapsed.as_secs() as usize + 1);
    assert!(
        !lines.is_empty() && lines.len() <= bound,
        "{} lines in {elapsed:?}",
        lines.len()
    );
    let suppressed: usize = lines
        .iter()
        .filter_map(|l| {
            l.split(" suppressed=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(lines.len() + suppressed <= N, "{lines:#?}");
}
