//! Access channel end to end: real binary, real SoftHSM token, real SQLite
//! file, loopback sockets on port 0.

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use keybroker::proto::access::{Frame, Message, encode};
use keybroker::terminal::{Terminal, TerminalConfig, TerminalError};
use std::time::Duration;

#[test]
fn login_release_and_xprime_agree() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    // login() already checked the broker's confirmation against our
    // X'confirm; a second session must derive different keys.
    let (c1, w1) = (t.keys().confirm(), *t.keys().wrap_key());
    assert_ne!(w1, [0u8; 32]);
    assert_ne!(c1, w1, "the two X' keys are apart");
    t.ping().unwrap();
    t.logout().unwrap();
    let t2 = released(&b, &alice, "alice");
    assert_ne!(c1, t2.keys().confirm());
    assert_ne!(&w1, t2.keys().wrap_key());
}

#[test]
fn cli_login_and_listing() {
    let env = Env::new("");
    env.user("alice");
    let b = env.broker();
    let (p1, p2) = pw("alice");
    let out = env
        .kb_in(
            &[
                "terminal",
                "login",
                "--dir",
                path_str(&env.terminal_dir("alice")),
                "--user",
                "alice",
                "--broker",
                &b.addr.to_string(),
            ],
            &format!("{p1}\n{p2}\n"),
        )
        .success();
    assert!(out.stdout().contains("released"), "{}", out.stdout());
    assert!(
        env.kb(&["user", "list"])
            .success()
            .stdout()
            .contains("alice@example.org")
    );
    assert!(
        env.kb(&["terminal", "list"])
            .success()
            .stdout()
            .contains("alice")
    );
}

#[test]
fn wrong_password_is_typed_and_session_continues() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = b.connect(&alice);
    assert_eq!(refused(t.login("alice", b"nope")), ErrorCode::WrongPassword);
    let (p1, p2) = pw("alice");
    t.login("alice", p1.as_bytes()).unwrap();
    assert_eq!(refused(t.release(b"nope")), ErrorCode::WrongPassword);
    t.release(p2.as_bytes()).unwrap();
}

#[test]
fn login_and_release_in_one_flight() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let (p1, p2) = pw("alice");
    let one = |first: &str, second: &str| {
        Terminal::connect_and_release(
            b.addr,
            &alice,
            TIMEOUT,
            "alice",
            first.as_bytes(),
            second.as_bytes(),
        )
    };
    // Both answers arrive, in order, and the session is released.
    let mut t = one(&p1, &p2).unwrap();
    t.ping().unwrap();
    assert_ne!(t.keys().wrap_key(), &[0u8; 32]);
    t.logout().unwrap();
    // A refused login refuses the pipelined release without checking its
    // password: the first refusal is what the terminal sees.
    assert_eq!(
        refused(one("nope", &p2).map(drop)),
        ErrorCode::WrongPassword
    );
    // A wrong second password is refused after a good login.
    assert_eq!(
        refused(one(&p1, "nope").map(drop)),
        ErrorCode::WrongPassword
    );
    // Two failures so far; the right pair still works.
    one(&p1, &p2).unwrap().logout().unwrap();
}

#[test]
fn unknown_user_and_release_before_login() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = b.connect(&alice);
    assert_eq!(refused(t.release(b"x")), ErrorCode::NotLoggedIn);
    assert_eq!(refused(t.login("mallory", b"x")), ErrorCode::UnknownUser);
    let (p1, _) = pw("alice");
    t.login("alice", p1.as_bytes()).unwrap();
}

#[test]
fn another_users_terminal_is_refused_and_closed() {
    let env = Env::new("");
    env.user("alice");
    let bob = env.user("bob");
    let b = env.broker();
    let mut t = b.connect(&bob);
    let (p1, _) = pw("alice");
    assert_eq!(
        refused(t.login("alice", p1.as_bytes())),
        ErrorCode::WrongTerminal
    );
    assert!(matches!(
        t.ping(),
        Err(TerminalError::Closed | TerminalError::Io(_))
    ));
}

#[test]
fn revoked_terminal_is_refused() {
    let env = Env::new("");
    let alice = env.user("alice");
    let serial = env.kb(&["terminal", "list"]).success().stdout();
    let serial = serial.split('\t').next().unwrap().to_owned();
    env.kb(&["terminal", "revoke", &serial]).success();
    let b = env.broker();
    let mut t = b.connect(&alice);
    let (p1, _) = pw("alice");
    assert_eq!(
        refused(t.login("alice", p1.as_bytes())),
        ErrorCode::TerminalRevoked
    );
}

#[test]
fn lockout_survives_restart_until_admin_unlocks() {
    let env = Env::new("");
    let alice = env.user("alice");
    let (p1, p2) = pw("alice");
    {
        let b = env.broker();
        let mut t = b.connect(&alice);
        assert_eq!(refused(t.login("alice", b"bad1")), ErrorCode::WrongPassword);
        assert_eq!(refused(t.login("alice", b"bad2")), ErrorCode::WrongPassword);
        assert_eq!(refused(t.login("alice", b"bad3")), ErrorCode::Locked);
        // The lock closed the connection.
        assert!(t.ping().is_err());
        // The right password no longer helps.
        let mut t = b.connect(&alice);
        assert_eq!(refused(t.login("alice", p1.as_bytes())), ErrorCode::Locked);
    }
    let b = env.broker();
    let mut t = b.connect(&alice);
    assert_eq!(refused(t.login("alice", p1.as_bytes())), ErrorCode::Locked);
    assert!(
        env.kb(&["user", "list"])
            .success()
            .stdout()
            .contains("locked")
    );
    env.kb(&["user", "unlock", "alice"]).success();
    let mut t = b.connect(&alice);
    t.login("alice", p1.as_bytes()).unwrap();
    t.release(p2.as_bytes()).unwrap();
}

#[test]
fn failures_on_release_count_towards_the_lock() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let (p1, _) = pw("alice");
    let mut t = b.connect(&alice);
    t.login("alice", p1.as_bytes()).unwrap();
    assert_eq!(refused(t.release(b"bad1")), ErrorCode::WrongPassword);
    assert_eq!(refused(t.release(b"bad2")), ErrorCode::WrongPassword);
    assert_eq!(refused(t.release(b"bad3")), ErrorCode::Locked);
}

#[test]
fn a_right_password_clears_the_failures() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let (p1, p2) = pw("alice");
    let mut t = b.connect(&alice);
    t.login("alice", p1.as_bytes()).unwrap();
    assert_eq!(refused(t.release(b"bad1")), ErrorCode::WrongPassword);
    assert_eq!(refused(t.release(b"bad2")), ErrorCode::WrongPassword);
    t.release(p2.as_bytes())
        .expect("the right one, before the lock");
    // Counting starts again: two more wrong ones do not lock.
    let mut t = b.connect(&alice);
    t.login("alice", p1.as_bytes()).unwrap();
    assert_eq!(refused(t.release(b"bad3")), ErrorCode::WrongPassword);
    assert_eq!(refused(t.release(b"bad4")), ErrorCode::WrongPassword);
    t.release(p2.as_bytes()).expect("not locked");
}

/// The next frame is an error `code` answering request `id`; then the
/// broker closes.
fn expect_error_then_close(t: &mut Terminal, code: ErrorCode, id: u32) {
    let f = t.recv().expect("an error frame");
    match f.msg {
        Message::Error { code: c, .. } => assert_eq!(c, code),
        other => panic!("expected error, got {other:?}"),
    }
    assert_eq!(f.id, id, "the error echoes the refused frame's id");
    assert!(matches!(
        t.recv(),
        Err(TerminalError::Closed | TerminalError::Io(_))
    ));
}

#[test]
fn malformed_and_oversized_frames_close_only_that_connection() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut bystander = b.connect(&alice);

    let mut t = b.connect(&alice);
    t.send_raw(&[0, 0, 0, 5, 0x42, 0, 0, 0, 1]).unwrap(); // unknown type
    expect_error_then_close(&mut t, ErrorCode::Malformed, 1);

    let mut t = b.connect(&alice);
    t.send_raw(&[0, 0, 0, 7, 0x01, 0, 0, 0, 2, 0, 99]).unwrap(); // truncated user
    expect_error_then_close(&mut t, ErrorCode::Malformed, 2);

    let mut t = b.connect(&alice);
    t.send_raw(&[0, 0, 0, 3, 0x01, 0, 0]).unwrap(); // len too short for a header
    expect_error_then_close(&mut t, ErrorCode::Malformed, 0);

    // 1 MiB announced: refused once the header is in, the body unread.
    let mut t = b.connect(&alice);
    t.send_raw(&[0, 0x10, 0, 0, 0x01, 0, 0, 0, 4]).unwrap();
    expect_error_then_close(&mut t, ErrorCode::TooLarge, 4);

    // A broker message sent by a terminal is a state error, not fatal.
    let mut t = b.connect(&alice);
    let mut out = Vec::new();
    encode(
        &Frame {
            id: 3,
            msg: Message::Bye,
        },
        &mut out,
    );
    t.send_raw(&out).unwrap();
    assert!(matches!(
        t.recv().unwrap().msg,
        Message::Error {
            code: ErrorCode::Unexpected,
            ..
        }
    ));
    t.ping().unwrap();

    bystander.ping().unwrap();
    let (p1, _) = pw("alice");
    bystander.login("alice", p1.as_bytes()).unwrap();
}

#[test]
fn client_without_certificate_fails_the_handshake() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let roots = env.broker_roots();
    let anon = TerminalConfig::new(roots, None).unwrap();
    // TLS 1.3: the client finishes first, then learns of the alert.
    let r = Terminal::connect(b.addr, &anon, TIMEOUT).and_then(|mut t| t.ping());
    assert!(r.is_err(), "a client without a certificate was served");
    let mut t = b.connect(&alice);
    t.ping().unwrap();
}

#[test]
fn a_connected_terminal_may_wait_past_the_handshake_timeout() {
    // A terminal that connects and waits for its user before the login:
    // its handshake is complete, so the idle timeout (3 s here) applies,
    // not the handshake timeout (2 s).
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = b.connect(&alice);
    std::thread::sleep(Duration::from_millis(2500));
    let (p1, _) = pw("alice");
    t.login("alice", p1.as_bytes()).unwrap();
    // The one-segment variant logs in at once.
    Terminal::connect_and_login(b.addr, &alice, TIMEOUT, "alice", p1.as_bytes())
        .unwrap()
        .ping()
        .unwrap();
}

#[test]
fn silent_peer_hits_the_idle_timeout() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = b.connect(&alice);
    // idle_timeout_ms = 3000 in the test config.
    expect_error_then_close(&mut t, ErrorCode::Timeout, 0);
}

#[test]
fn reconnect_resumes_with_a_session_ticket() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let t = released(&b, &alice, "alice");
    assert!(!t.resumed());
    t.logout().unwrap();
    let t = released(&b, &alice, "alice");
    assert!(t.resumed(), "second connection did not resume");
}

#[test]
fn second_broker_cannot_share_the_port() {
    let env = Env::new("");
    env.user("alice");
    let b = env.broker();
    let cfg = env.dir.path().join("second.toml");
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        "[broker]\nlisten = \"127.0.0.1:0\"",
        &format!("[broker]\nlisten = \"{}\"", b.addr),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another broker"), "{err}");
}

#[test]
fn bad_enrolment_input_is_refused() {
    let env = Env::new("");
    let out = env.kb_in(
        &["user", "add", "bad id", "--mail", "x@example.org"],
        "a\nb\n",
    );
    assert!(!out.0.status.success());
    let out = env.kb_in(&["user", "add", "carol", "--mail", "not-a-mail"], "a\nb\n");
    assert!(!out.0.status.success());
    let out = env.kb_in(
        &["user", "add", "carol", "--mail", "c@example.org"],
        "same\nsame\n",
    );
    assert!(!out.0.status.success());
    let out = env.kb(&["terminal", "enroll", "nobody", "--out", "/tmp/never"]);
    assert!(!out.0.status.success());
}
