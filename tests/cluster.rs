//! Two broker nodes sharing one HSM token, one registry and one ledger,
//! behind a real HAProxy in TCP mode with the PROXY protocol (v2).

mod common;

use common::*;
use keybroker::terminal::{Direct, Terminal};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct HaProxy(Child);

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy(env: &Env, nodes: &[SocketAddr]) -> (HaProxy, SocketAddr) {
    let found = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "haproxy not found: `make deps` installs Debian's haproxy"
    );
    let port = common::relay::free_port();
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  server n{i} {a} send-proxy-v2 check inter 100 fall 1 rise 2\n"))
        .collect();
    let cfg = env.dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 2000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  \
             retries 3\n  option redispatch\nfrontend access\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance roundrobin\n{servers}"
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(Stdio::null())
        .spawn()
        .expect("start haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (HaProxy(child), addr)
}

/// TLS handshakes a node has completed, from its own /metrics.
fn handshakes(admin: SocketAddr) -> f64 {
    metric(admin, "keybroker_handshake_duration_seconds_count")
}

fn decision_of(receipt: &[u8]) -> String {
    keybroker::receipt::SignedReceipt::decode(receipt)
        .unwrap()
        .receipt
        .decision_id
}

#[test]
fn purchase_on_one_node_cancel_on_the_other() {
    let (env, issuer) = wallet_env(None, "proxy_protocol = true");
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let (n1, n2) = (env.broker(), env.broker());
    let (_h, front) = haproxy(&env, &[n1.addr, n2.addr]);
    let (p1, p2) = pw("alice");
    let login = |t: &mut Terminal| {
        t.login("alice", p1.as_bytes()).unwrap();
        t.release(p2.as_bytes()).unwrap();
    };
    // A direct connection without a PROXY header is refused.
    assert!(
        Terminal::connect(n1.addr, &alice, TIMEOUT)
            .and_then(|mut t| t.ping())
            .is_err()
    );

    let before = (handshakes(n1.admin), handshakes(n2.admin));
    let mut a = Terminal::connect(front, &alice, TIMEOUT).unwrap();
    login(&mut a);
    a.top_up(&voucher(&env, &issuer, "alice", 5_000, "v"), p2.as_bytes())
        .unwrap();
    let (_, receipt) = a
        .purchase("m1", 1_500, "EUR", "cluster order", "k1")
        .unwrap();
    let decision = decision_of(&receipt);
    let mid = (handshakes(n1.admin), handshakes(n2.admin));
    let mut b = Terminal::connect(front, &alice, TIMEOUT).unwrap();
    login(&mut b);
    let bx = b.exchange("m1").unwrap();
    let mut d = Direct::connect(&bx, TIMEOUT).unwrap();
    d.present_receipt(&receipt).unwrap();
    let auth = d.cancel_authorisation(&decision).unwrap();
    assert_eq!(b.cancel(&decision, auth).unwrap(), 5_000);
    let after = (handshakes(n1.admin), handshakes(n2.admin));
    // Round robin: the two sessions were served by different nodes.
    let first = (mid.0 - before.0, mid.1 - before.1);
    let second = (after.0 - mid.0, after.1 - mid.1);
    assert!(
        (first == (1.0, 0.0) && second == (0.0, 1.0))
            || (first == (0.0, 1.0) && second == (1.0, 0.0)),
        "sessions were not spread over the nodes: {first:?} then {second:?}"
    );
    assert!(
        env.kb(&["wallet", "audit"])
            .success()
            .stdout()
            .contains("audit ok")
    );
}

#[test]
fn a_node_killed_under_load_its_terminals_resume_on_the_survivor() {
    let (env, issuer) = wallet_env(None, "proxy_protocol = true");
    env.user("alice");
    let _m = env.market("m1", "*");
    let (mut n1, n2) = (env.broker(), env.broker());
    let (_h, front) = haproxy(&env, &[n1.addr, n2.addr]);
    let (p1, p2) = pw("alice");
    let tcs: Vec<_> = (0..4)
        .map(|i| env.terminal("alice", &format!("k{i}")))
        .collect();
    let mut terms: Vec<Terminal> = tcs
        .iter()
        .map(|tc| {
            let mut t = Terminal::connect(front, tc, TIMEOUT).unwrap();
            t.login("alice", p1.as_bytes()).unwrap();
            t.release(p2.as_bytes()).unwrap();
            t
        })
        .collect();
    terms[0]
        .top_up(
            &voucher(&env, &issuer, "alice", 100_000, "v"),
            p2.as_bytes(),
        )
        .unwrap();
    let mut acked = Vec::new();
    for round in 0..5 {
        for (i, t) in terms.iter_mut().enumerate() {
            let (_, r) = t
                .purchase("m1", 10, "EUR", "load", &format!("r{round}-t{i}"))
                .unwrap();
            acked.push(decision_of(&r));
        }
    }
    let _ = n1.child.kill();
    let _ = n1.child.wait();
    // Every terminal carries on: the ones on the dead node reconnect through
    // HAProxy to the survivor with their session ticket.
    let mut resumed = 0;
    for (i, (t, tc)) in terms.iter_mut().zip(&tcs).enumerate() {
        if t.ping().is_ok() {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let fresh = loop {
            match Terminal::connect(front, tc, TIMEOUT).and_then(|mut t| t.ping().map(|()| t)) {
                Ok(f) => break f,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "terminal {i} could not reconnect: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        assert!(
            fresh.resumed(),
            "terminal {i} did a full handshake on the survivor"
        );
        resumed += 1;
        *t = fresh;
        t.login("alice", p1.as_bytes()).unwrap();
        t.release(p2.as_bytes()).unwrap();
    }
    assert!(resumed > 0, "no terminal was on the killed node");
    for (i, t) in terms.iter_mut().enumerate() {
        let (_, r) = t
            .purchase("m1", 10, "EUR", "load", &format!("after-t{i}"))
            .unwrap();
        acked.push(decision_of(&r));
    }
    // Nothing acknowledged was lost, nothing applied twice.
    let hist = env.kb(&["wallet", "history", "alice"]).success().stdout();
    for d in &acked {
        assert_eq!(hist.matches(d.as_str()).count(), 1, "decision {d}");
    }
    assert!(
        env.kb(&["wallet", "audit"])
            .success()
            .stdout()
            .contains("audit ok")
    );
    drop(n2);
}
