//! The direct channel against the real reference market, over loopback:
//! replays from a second connection, per-connection keys, and every bad
//! input's alert and audit line (docs/PROTOCOL.md §3).

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use keybroker::proto::direct::{self, Decoder, Initiator};
use keybroker::terminal::{Brokered, Direct};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A raw TCP connection to the market's direct port, for sending recorded
/// or hand-made bytes.
struct Raw {
    sock: TcpStream,
    dec: Decoder,
}

impl Raw {
    fn to(b: &Brokered) -> Self {
        let sock = TcpStream::connect(&b.endpoint).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self {
            sock,
            dec: Decoder::default(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// The next frame, or None once the market closed.
    fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Some(f);
            }
            match self.sock.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
            }
        }
    }

    /// Reads to the market's alert and checks that it then closes.
    fn alert(&mut self) -> ErrorCode {
        let (ty, p) = self.frame().expect("an alert before the close");
        assert_eq!(ty, direct::ALERT, "expected an alert, got frame {ty:#x}");
        assert!(
            self.frame().is_none(),
            "the market stays open after an alert"
        );
        ErrorCode::from_u16(u16::from_be_bytes(p[..2].try_into().unwrap())).unwrap()
    }
}

fn code_of<T>(r: Result<T, keybroker::terminal::TerminalError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

#[test]
fn a_recorded_flight_is_worthless_on_a_new_connection() {
    let env = Env::new("");
    let alice = env.user("alice");
    let log = env.dir.path().join("market.log");
    let _m = env.market_with("m1", "*", "", Some(&log));
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    let s = t.exchange("m1").unwrap();

    // The genuine flight, recorded: Hello, then (after HelloOk) a request.
    let mut a = Raw::to(&s);
    let mut hello = Vec::new();
    let init = Initiator::start(&s.x, s.session_id, &mut hello);
    a.send(&hello);
    let (ty, ok_a) = a.frame().unwrap();
    assert_eq!(ty, direct::HELLO_OK);
    let mut ch = init.finish(&ok_a).unwrap();
    let mut request = Vec::new();
    ch.seal(b"pay 10 to bob", &mut request);
    a.send(&request);
    let (ty, answer) = a.frame().unwrap();
    assert_eq!(ty, direct::RECORD);
    assert!(
        String::from_utf8(ch.open(&answer).unwrap())
            .unwrap()
            .contains("pay 10 to bob")
    );

    // Replayed byte for byte on a second connection, in one flight: the
    // market answers the Hello with a fresh ephemeral, and the request,
    // sealed under the first connection's keys, is refused unread.
    let mut r = Raw::to(&s);
    r.send(&[hello.clone(), request.clone()].concat());
    let (ty, ok_r) = r.frame().unwrap();
    assert_eq!(ty, direct::HELLO_OK);
    assert_ne!(ok_a, ok_r, "the market's handshake message repeats");
    assert_eq!(r.alert(), ErrorCode::BadRecord);
    // And again after the first connection has closed.
    drop(a);
    let mut r = Raw::to(&s);
    r.send(&[hello, request].concat());
    assert_eq!(r.frame().unwrap().0, direct::HELLO_OK);
    assert_eq!(r.alert(), ErrorCode::BadRecord);

    // Two connections of one session: the same request at the same
    // position gives unrelated ciphertexts (no key or nonce is shared), and
    // neither connection opens the other's record.
    let mut c = Direct::connect(&s, TIMEOUT).unwrap();
    let mut d = Direct::connect(&s, TIMEOUT).unwrap();
    let (rc, rd) = (c.seal(b"pay 10"), d.seal(b"pay 10"));
    assert_eq!(rc.len(), rd.len());
    assert_ne!(rc[5..], rd[5..]);
    d.send_raw(&rc).unwrap();
    assert_eq!(code_of(d.receive()), Some(ErrorCode::BadRecord));
    c.send_raw(&rc).unwrap();
    assert!(
        String::from_utf8(c.receive().unwrap())
            .unwrap()
            .contains("pay 10")
    );

    // Every refusal above is an audit line naming the peer.
    wait_until("the audit lines", TIMEOUT, || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains("direct channel refused")
                    && l.contains("peer=127.0.0.1:")
                    && l.contains("code=bad_record")
                    && l.contains("user=alice")
            })
            .count()
            == 3
    });
}

#[test]
fn every_bad_input_gets_its_alert_and_the_market_serves_on() {
    let env = Env::new("");
    let alice = env.user("alice");
    let log = env.dir.path().join("market.log");
    let _m = env.market_with(
        "m1",
        "*",
        "session_ttl_s = 4\nmax_connections_per_session = 3\nhello_timeout_ms = 300\n",
        Some(&log),
    );
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    let s = t.exchange("m1").unwrap();
    let other = t.exchange("m1").unwrap();

    // A session the market never issued.
    let unknown = Brokered {
        session_id: [0xAA; 16],
        x: s.x.clone(),
        endpoint: s.endpoint.clone(),
        expiry_ms: s.expiry_ms,
    };
    assert_eq!(
        code_of(Direct::connect(&unknown, TIMEOUT)),
        Some(ErrorCode::UnknownSession)
    );
    // A real session id with another session's X: the handshake fails.
    let wrong_x = Brokered {
        session_id: s.session_id,
        x: other.x.clone(),
        endpoint: s.endpoint.clone(),
        expiry_ms: s.expiry_ms,
    };
    assert_eq!(
        code_of(Direct::connect(&wrong_x, TIMEOUT)),
        Some(ErrorCode::BadHandshake)
    );
    // Junk where a Hello should be.
    let mut r = Raw::to(&s);
    let mut junk = Vec::new();
    direct::frame(direct::HELLO, &[0; 20], &mut junk);
    r.send(&junk);
    assert_eq!(r.alert(), ErrorCode::Malformed);
    // A record before any Hello.
    let mut r = Raw::to(&s);
    let mut rec = Vec::new();
    direct::frame(direct::RECORD, &[0; 32], &mut rec);
    r.send(&rec);
    assert_eq!(r.alert(), ErrorCode::Unexpected);
    // Silent after connecting: the Hello timeout, counted from accept.
    let mut r = Raw::to(&s);
    let t0 = Instant::now();
    assert_eq!(r.alert(), ErrorCode::Timeout);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    // Connection 1: a tampered tag.
    let mut d = Direct::connect(&s, TIMEOUT).unwrap();
    let mut rec = d.seal(b"pay 10");
    let last = rec.len() - 1;
    rec[last] ^= 1;
    d.send_raw(&rec).unwrap();
    assert_eq!(code_of(d.receive()), Some(ErrorCode::BadRecord));
    // Connection 2: a sequence gap (the second record sent first), then the
    // replay of an accepted record on the same connection.
    let mut d = Direct::connect(&s, TIMEOUT).unwrap();
    let _first = d.seal(b"one");
    let second = d.seal(b"two");
    d.send_raw(&second).unwrap();
    assert_eq!(code_of(d.receive()), Some(ErrorCode::BadRecord));
    // Connection 3: a second Hello on a live connection.
    let mut d = Direct::connect(&s, TIMEOUT).unwrap();
    assert!(d.request(b"still fine").is_ok());
    let mut hello = Vec::new();
    let _ = Initiator::start(&s.x, s.session_id, &mut hello);
    d.send_raw(&hello).unwrap();
    assert_eq!(code_of(d.receive()), Some(ErrorCode::Unexpected));
    // Connection 4 of a session capped at 3.
    assert_eq!(
        code_of(Direct::connect(&s, TIMEOUT)),
        Some(ErrorCode::TooManyConnections)
    );

    // Another session is served all along, and after its expiry (an
    // absolute time) is refused at Hello and on a live connection.
    let mut live = Direct::connect(&other, TIMEOUT).unwrap();
    assert!(live.request(b"quote").is_ok());
    let wait = other.expiry_ms.saturating_sub(keybroker::market::now_ms()) + 50;
    std::thread::sleep(Duration::from_millis(wait));
    let late = live.seal(b"late");
    live.send_raw(&late).unwrap();
    assert_eq!(code_of(live.receive()), Some(ErrorCode::SessionExpired));
    assert_eq!(
        code_of(Direct::connect(&other, TIMEOUT)),
        Some(ErrorCode::SessionExpired)
    );
    // A fresh session still works: the market served everyone throughout.
    // (The access session idled out meanwhile: log in again.)
    let fresh = released(&b, &alice, "alice").exchange("m1").unwrap();
    assert!(
        Direct::connect(&fresh, TIMEOUT)
            .unwrap()
            .request(b"quote")
            .is_ok()
    );

    let expected = [
        ("unknown_session", 1),
        ("bad_handshake", 1),
        ("malformed", 1),
        ("unexpected", 2),
        ("timeout", 1),
        ("bad_record", 2),
        ("too_many_connections", 1),
        ("session_expired", 2),
    ];
    wait_until("the audit lines", TIMEOUT, || {
        let text = std::fs::read_to_string(&log).unwrap();
        expected.iter().all(|(code, n)| {
            text.lines()
                .filter(|l| {
                    l.contains("direct channel refused")
                        && l.contains("peer=127.0.0.1:")
                        && l.contains(&format!("code={code}"))
                })
                .count()
                == *n
        })
    });
}

/// A terminal in another language, written from the spec with an
/// independent Noise library, talks to the real market with the X the
/// broker agreed (and is refused with the right alert for a wrong X).
#[test]
fn a_python_terminal_from_the_spec_talks_to_the_market() {
    let env = Env::new("");
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let b = env.broker();
    let mut t = released(&b, &alice, "alice");
    let s = t.exchange("m1").unwrap();
    let other = t.exchange("m1").unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/direct_terminal.py"
    );
    let run = |x: &[u8]| {
        let out = std::process::Command::new("python3")
            .args([
                script,
                &hex::encode(s.session_id),
                &hex::encode(x),
                &s.endpoint,
                "hello from python",
            ])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let answer = run(&*s.x);
    assert!(
        answer.contains("market m1 to alice: hello from python"),
        "{answer}"
    );
    let refused = run(&*other.x);
    assert_eq!(
        refused.trim(),
        format!("alert {}", ErrorCode::BadHandshake as u16)
    );
}
