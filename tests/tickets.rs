//! Session tickets over real sockets (broker/tickets.rs, docs/DECISIONS.md
//! "Session tickets"): a ticket resumes once, not past its advertised
//! lifetime, and not past the terminal certificate's notAfter.

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use keybroker::proto::access::{Frame, Message, encode};
use keybroker::terminal::{Terminal, TerminalConfig};
use rustls::pki_types::UnixTime;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TICKETS: &str = "keybroker_session_tickets_total";

fn tickets(b: &Broker, result: &str) -> f64 {
    metric(b.admin, &format!("{TICKETS}{{result=\"{result}\"}}"))
}

/// Logs `u` in on a fresh connection and out again; whether it resumed.
fn session(b: &Broker, tc: &TerminalConfig, u: &str) -> bool {
    let mut t = b.connect(tc);
    t.login(u, pw(u).0.as_bytes()).expect("login");
    let resumed = t.resumed();
    t.logout().unwrap();
    resumed
}

/// One `openssl s_client` session with the terminal in `dir`: Ping, then
/// Logout. `sess` is written (`-sess_out`) when `out`, else read
/// (`-sess_in`). Returns s_client's output.
fn s_client(b: &Broker, dir: &Path, sess: &Path, out: bool) -> String {
    let mut input = Vec::new();
    encode(
        &Frame {
            id: 1,
            msg: Message::Ping,
        },
        &mut input,
    );
    encode(
        &Frame {
            id: 2,
            msg: Message::Logout,
        },
        &mut input,
    );
    let file = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_3",
            "-ign_eof",
            "-connect",
            &b.addr.to_string(),
        ])
        .args([
            "-cert",
            &file("terminal.crt"),
            "-key",
            &file("terminal.key"),
        ])
        .args(["-CAfile", &file("broker-ca.crt")])
        .args([if out { "-sess_out" } else { "-sess_in" }, path_str(sess)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client (`make deps` installs openssl)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let done = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&done.stdout).into_owned()
}

/// "New" or "Reused": how s_client says its handshake went.
fn handshake(s_client_out: &str) -> &'static str {
    s_client_out
        .lines()
        .find_map(|l| {
            ["New", "Reused"]
                .into_iter()
                .find(|k| l.starts_with(&format!("{k}, TLSv1.3")))
        })
        .unwrap_or_else(|| panic!("no handshake line in {s_client_out}"))
}

#[test]
fn a_ticket_resumes_once() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    // The bundled terminal (rustls) spends each ticket once and resumes
    // with the one every resumption brings.
    assert!(!session(&b, &alice, "alice"));
    for _ in 0..3 {
        assert!(
            session(&b, &alice, "alice"),
            "a fresh ticket did not resume"
        );
    }
    assert_eq!(tickets(&b, "reused"), 0.0);
    // OpenSSL presents one saved session as often as it is told to: the
    // broker resumes it once, then makes it a full handshake.
    let dir = env.terminal_dir("alice");
    let sess = env.dir.path().join("alice.sess");
    let first = s_client(&b, &dir, &sess, true);
    assert_eq!(handshake(&first), "New");
    // The default lifetime, ticket_hours = 12, is what the ticket says.
    assert!(
        first.contains("ticket lifetime hint: 43200 (seconds)"),
        "{first}"
    );
    assert_eq!(handshake(&s_client(&b, &dir, &sess, false)), "Reused");
    assert_eq!(handshake(&s_client(&b, &dir, &sess, false)), "New");
    assert_eq!(handshake(&s_client(&b, &dir, &sess, false)), "New");
    assert_eq!(tickets(&b, "reused"), 2.0);
}

/// A clock stopped at the time it was made.
#[derive(Debug)]
struct Stopped(UnixTime);

impl rustls::time_provider::TimeProvider for Stopped {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.0)
    }
}

#[test]
fn a_ticket_past_its_lifetime_does_not_resume() {
    let env = Env::with_broker("ticket_lifetime_s = 2", "");
    let alice = env.user("alice");
    let b = env.broker();
    // A terminal whose clock stands still offers its ticket however old
    // it is (a rustls or OpenSSL client with a true clock would not offer
    // an expired one at all): the broker's own check is what refuses it.
    let mut client = (*alice.client).clone();
    client.time_provider = Arc::new(Stopped(UnixTime::now()));
    let stopped = TerminalConfig {
        client: Arc::new(client),
        server_name: alice.server_name.clone(),
    };
    assert!(!session(&b, &stopped, "alice"));
    assert!(
        session(&b, &stopped, "alice"),
        "a young ticket did not resume"
    );
    std::thread::sleep(Duration::from_millis(3100));
    assert!(!session(&b, &stopped, "alice"), "an old ticket resumed");
    assert_eq!(tickets(&b, "expired"), 1.0);
    // What the broker advertised is what it held the ticket to.
    let sess = env.dir.path().join("alice.sess");
    let out = s_client(&b, &env.terminal_dir("alice"), &sess, true);
    assert!(out.contains("ticket lifetime hint: 2 (seconds)"), "{out}");
}

/// The certificate's notAfter, Unix seconds.
fn not_after(dir: &Path) -> u64 {
    let pem = std::fs::read_to_string(dir.join("terminal.crt")).unwrap();
    let der = keybroker::pki::read_cert_pem(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.validity().not_after.timestamp() as u64
}

#[test]
fn an_expired_certificate_does_not_resume() {
    let env = Env::new("");
    let (p1, p2) = pw("alice");
    env.kb_in(
        &["user", "add", "alice", "--mail", "alice@example.org"],
        &format!("{p1}\n{p2}\n"),
    )
    .success();
    let b = env.broker();
    let dir = env.terminal_dir("short");
    env.kb(&[
        "terminal",
        "enroll",
        "alice",
        "--out",
        path_str(&dir),
        "--valid-s",
        "4",
    ])
    .success();
    let short = TerminalConfig::load(&dir).unwrap();
    assert!(!session(&b, &short, "alice"));
    // Wait until the certificate is past its notAfter (one-second resolution).
    let end = UNIX_EPOCH + Duration::from_secs(not_after(&dir) + 1);
    let wait = end.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        wait > Duration::ZERO,
        "the session took longer than the certificate lived"
    );
    std::thread::sleep(wait);
    // The ticket is young and unused, so TLS resumes; the broker then
    // finds the restored certificate expired and refuses the login.
    let mut t = b.connect(&short);
    assert!(t.resumed());
    assert_eq!(
        refused(t.login("alice", p1.as_bytes())),
        ErrorCode::TerminalRevoked
    );
    assert_eq!(
        metric(b.admin, "keybroker_errors_total{code=\"terminal_revoked\"}"),
        1.0
    );
    // A full handshake with that certificate fails in TLS, as before.
    let mut client = (*short.client).clone();
    client.resumption = rustls::client::Resumption::disabled();
    let full = TerminalConfig {
        client: Arc::new(client),
        server_name: short.server_name.clone(),
    };
    let r = Terminal::connect_and_login(b.addr, &full, TIMEOUT, "alice", p1.as_bytes());
    assert!(
        matches!(r, Err(ref e) if e.code().is_none()),
        "{:?}",
        r.err()
    );
}
