//! Revocation on a running broker: a terminal revoked or a user removed in
//! the registry (by the CLI, in its own process, on the broker's own data
//! directory) loses its open sessions within a second, whether it is asking
//! or idle, without a Release; its session tickets resume TLS on any node
//! but log in nowhere. Real binary, SoftHSM token, SQLite file, sockets.

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use keybroker::proto::access::{Frame, Message};
use keybroker::terminal::{Terminal, TerminalError};
use std::time::{Duration, Instant};

/// What the issue allows between the revocation and its effect.
const LIMIT: Duration = Duration::from_secs(1);

/// The registry serial of the terminal enrolled into directory `name`,
/// from `terminal list` (serial, user, state, fingerprint).
fn serial(env: &Env, name: &str) -> String {
    let pem = std::fs::read_to_string(env.terminal_dir(name).join("terminal.crt")).unwrap();
    let fp = keybroker::pki::fingerprint(&keybroker::pki::read_cert_pem(&pem).unwrap());
    let list = env.kb(&["terminal", "list"]).success().stdout();
    let line = list
        .lines()
        .find(|l| l.ends_with(&hex::encode(fp)))
        .expect("enrolled");
    line.split('\t').next().unwrap().to_owned()
}

fn revoke(env: &Env, serial: &str) {
    env.kb(&["terminal", "revoke", serial]).success();
}

/// Waits on an idle session for the broker's next frame: how long after
/// `since` it came, and what it was. The test config's idle timeout is 3 s,
/// so an answer inside [`LIMIT`] is the revocation's.
fn idle(mut t: Terminal, since: std::sync::mpsc::Receiver<Instant>) -> (Duration, Frame) {
    let first = t.recv();
    let at = Instant::now();
    let since = since.recv().unwrap();
    let frame = first.expect("a frame before the close");
    assert!(
        matches!(t.recv(), Err(TerminalError::Closed | TerminalError::Io(_))),
        "the broker kept the session open"
    );
    (at.saturating_duration_since(since), frame)
}

/// Revokes with `revoke` while `asking` sends requests and `waiting` sits
/// idle, both released; checks both end with `terminal_revoked` inside
/// [`LIMIT`] and returns the two delays.
fn ends_both(
    mut asking: Terminal,
    waiting: Terminal,
    revoke: impl FnOnce(),
) -> (Duration, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let idle = std::thread::spawn(move || idle(waiting, rx));
    asking.balance().expect("served before the revocation");
    revoke();
    let since = Instant::now();
    tx.send(since).unwrap();
    let refused = loop {
        match asking.balance() {
            Ok(_) => {
                assert!(since.elapsed() < LIMIT, "still served after {LIMIT:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break (since.elapsed(), e),
        }
    };
    assert_eq!(
        refused.1.code(),
        Some(ErrorCode::TerminalRevoked),
        "{}",
        refused.1
    );
    assert!(refused.0 < LIMIT, "refused only after {:?}", refused.0);
    assert!(
        matches!(
            asking.ping(),
            Err(TerminalError::Closed | TerminalError::Io(_))
        ),
        "the refusal did not close the session"
    );
    let (waited, frame) = idle.join().unwrap();
    match frame.msg {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::TerminalRevoked),
        other => panic!("expected terminal_revoked, got {other:?}"),
    }
    assert_eq!(frame.id, 0, "an unsolicited error answers no request");
    assert!(
        waited < LIMIT,
        "the idle session ended only after {waited:?}"
    );
    eprintln!(
        "revocation: refused after {:?}, idle session cut after {waited:?}",
        refused.0
    );
    (refused.0, waited)
}

#[test]
fn revoking_a_terminal_ends_its_open_sessions_at_once() {
    let env = Env::new("");
    let alice = env.user("alice");
    let other = env.terminal("alice", "alice-other");
    let b = env.broker();
    let asking = released(&b, &alice, "alice");
    let waiting = released(&b, &alice, "alice");
    let mut bystander = released(&b, &other, "alice");
    let serial = serial(&env, "alice");
    ends_both(asking, waiting, || revoke(&env, &serial));
    // The user's other terminal keeps its session.
    bystander.balance().unwrap();
}

#[test]
fn removing_a_user_ends_its_terminals_sessions_at_once() {
    let env = Env::new("");
    let bob = env.user("bob");
    let bob2 = env.terminal("bob", "bob-2");
    let alice = env.user("alice");
    let b = env.broker();
    let asking = released(&b, &bob, "bob");
    let waiting = released(&b, &bob2, "bob");
    let mut bystander = released(&b, &alice, "alice");
    ends_both(asking, waiting, || {
        env.kb(&["user", "remove", "bob"]).success();
    });
    bystander.balance().unwrap();
}

/// A connection of the terminal that has not logged in yet is cut too.
#[test]
fn a_revoked_terminal_that_has_not_logged_in_is_cut_too() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let t = b.connect(&alice);
    let (tx, rx) = std::sync::mpsc::channel();
    let serial = serial(&env, "alice");
    let idle = std::thread::spawn(move || idle(t, rx));
    revoke(&env, &serial);
    tx.send(Instant::now()).unwrap();
    let (waited, frame) = idle.join().unwrap();
    assert!(matches!(
        frame.msg,
        Message::Error {
            code: ErrorCode::TerminalRevoked,
            ..
        }
    ));
    assert!(waited < LIMIT, "{waited:?}");
}

/// Nodes on one registry and one HSM token: the revocation reaches the
/// sessions on both nodes running, and a ticket issued before it resumes
/// the TLS session on any node, one started since included, but Login
/// reads the registry and refuses it.
#[test]
fn tickets_of_a_revoked_terminal_log_in_on_no_node() {
    let env = Env::new("");
    let alice = env.user("alice");
    let (n1, n2) = (env.broker(), env.broker());
    let on_n1 = released(&n1, &alice, "alice");
    let mut on_n2 = released(&n2, &alice, "alice");
    assert!(
        on_n2.resumed(),
        "the ticket from node 1 did not resume on node 2"
    );
    on_n2.balance().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let cut_n1 = std::thread::spawn(move || idle(on_n1, rx));
    let (tx2, rx2) = std::sync::mpsc::channel();
    let cut_n2 = std::thread::spawn(move || idle(on_n2, rx2));
    revoke(&env, &serial(&env, "alice"));
    let now = Instant::now();
    tx.send(now).unwrap();
    tx2.send(now).unwrap();
    for (node, cut) in [("1", cut_n1), ("2", cut_n2)] {
        let (waited, frame) = cut.join().unwrap();
        assert!(
            matches!(
                frame.msg,
                Message::Error {
                    code: ErrorCode::TerminalRevoked,
                    ..
                }
            ),
            "node {node}: {frame:?}"
        );
        assert!(
            waited < LIMIT,
            "node {node} cut the session after {waited:?}"
        );
    }
    // Node 3 starts after the revocation, so it has nothing in memory to
    // refuse the terminal by: its refusal is Login's registry check.
    let n3 = env.broker();
    let (p1, p2) = pw("alice");
    for (node, b) in [("1", &n1), ("2", &n2), ("3", &n3)] {
        let r = Terminal::connect(b.addr, &alice, TIMEOUT).and_then(|mut t| {
            assert!(t.resumed(), "node {node}: no ticket left to resume with");
            t.login("alice", p1.as_bytes())?;
            t.release(p2.as_bytes())
        });
        assert_eq!(refused(r), ErrorCode::TerminalRevoked, "node {node}");
    }
}
