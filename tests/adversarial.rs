//! Adversarial inputs over real sockets: slow and silent peers, floods past
//! the limits, password guessing in parallel. The broker must answer with
//! typed errors or close, keep its memory bounded, and keep serving others.

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use keybroker::proto::access::Message;
use keybroker::terminal::TerminalError;
use keybroker::terminal::{Terminal, TerminalConfig};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Reads until the peer closes; true if it closed within `limit`.
fn closes_within(mut s: TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed() <= limit,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_peer_before_the_handshake_is_dropped() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    // handshake_timeout_ms = 2000 in the test config.
    let s = TcpStream::connect(b.addr).unwrap();
    assert!(
        closes_within(s, Duration::from_secs(5)),
        "a silent TCP peer was kept"
    );
    b.connect(&alice).ping().unwrap();
}

#[test]
fn slowloris_frames_hit_the_frame_timeout() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = b.connect(&alice);
    // A Login frame header trickled one byte per 400 ms: each read resets
    // the idle timer (3 s), but the frame must complete within 1.5 s.
    let started = Instant::now();
    for byte in [0u8, 0, 0, 40, 0x01, 0, 0, 0, 1, 0, 5] {
        if t.send_raw(&[byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(400));
        if started.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    match t.recv() {
        Ok(f) => {
            assert!(
                matches!(
                    f.msg,
                    Message::Error {
                        code: ErrorCode::Timeout,
                        ..
                    }
                ),
                "{f:?}"
            );
        }
        Err(TerminalError::Closed | TerminalError::Io(_)) => {}
        Err(e) => panic!("{e}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "a trickling peer held the connection"
    );
    b.connect(&alice).ping().unwrap();
}

#[test]
fn connection_flood_is_refused_and_memory_stays_bounded() {
    let _serial = serial();
    let env = Env::with_broker("max_connections_per_core = 8", "");
    let alice = env.user("alice");
    let b = env.broker();
    let before = rss_kib(b.child.id());
    // 400 silent TCP connections against a limit of 8 per core (2 cores):
    // at most 16 are held (until the 2 s handshake timeout); the rest are
    // closed at accept, at once.
    let floods: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect(b.addr).ok())
        .collect();
    let quick = floods
        .into_iter()
        .map(|s| closes_within(s, Duration::from_millis(1000)))
        .filter(|c| *c)
        .count();
    assert!(
        quick >= 400 - 16,
        "only {quick} of 400 flood connections were closed at once"
    );
    let after = rss_kib(b.child.id());
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // Once the flood is gone, sessions up to the limit are served. The
    // kernel steers a connection to the core of the CPU it came from
    // (`net::cores`), so one client thread may fill a single core: 7 held
    // and the release below stay within one core's 8.
    std::thread::sleep(Duration::from_millis(2500));
    let mut held: Vec<_> = (0..7).map(|_| b.connect(&alice)).collect();
    for t in held.iter_mut() {
        t.ping().unwrap();
    }
    released(&b, &alice, "alice");
}

#[test]
fn parallel_password_guessing_cannot_beat_the_lock() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    // max_failures = 3 in the test config; ten guessers at once.
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let mut t = b.connect(&alice);
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                for j in 0..3 {
                    match t.login("alice", format!("guess-{i}-{j}").as_bytes()) {
                        Err(TerminalError::Refused { code, .. }) => answers.push(code),
                        Err(_) => break,
                        Ok(()) => panic!("a guess logged in"),
                    }
                    if answers.last() == Some(&ErrorCode::Locked) {
                        break;
                    }
                }
                answers
            })
        })
        .collect();
    let answers: Vec<ErrorCode> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let wrong = answers
        .iter()
        .filter(|c| **c == ErrorCode::WrongPassword)
        .count();
    assert!(
        wrong <= 2,
        "{wrong} guesses were answered wrong_password past the lock"
    );
    // Ten guessers on one terminal may also go over its check rate: busy.
    assert!(answers.iter().all(|c| matches!(
        c,
        ErrorCode::WrongPassword | ErrorCode::Locked | ErrorCode::Busy
    )));
    // Once the terminal's rate has refilled, the right password meets the lock.
    let (p1, _) = pw("alice");
    let mut t = b.connect(&alice);
    let until = Instant::now() + TIMEOUT;
    let code = loop {
        match refused(t.login("alice", p1.as_bytes())) {
            ErrorCode::Busy if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(100))
            }
            code => break code,
        }
    };
    assert_eq!(code, ErrorCode::Locked);
}

/// Taken by the tests that load the machine or time the broker, so that
/// they do not run at the same time as each other on a 2-core runner.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// CPU seconds the process has used (user + system).
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15, 12 and 13 after the name.
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// A TCP connection from the local address `from` (127.0.0.2 is a second
/// source on loopback).
fn connect_from(from: &str, to: SocketAddr) -> Option<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::new(from.parse().unwrap(), 0).into())
        .ok()?;
    s.connect_timeout(&to.into(), Duration::from_millis(500))
        .ok()?;
    Some(s.into())
}

/// Lines of the log at `path` that contain every one of `words`.
fn log_lines(path: &Path, words: &[&str]) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

fn all_log_lines(path: &Path) -> usize {
    log_lines(path, &[])
}

#[test]
fn a_flood_past_the_descriptor_limit_costs_under_a_core_and_a_few_log_lines() {
    let _serial = serial();
    let env = Env::with_broker("max_pending_per_source = 8", "");
    let alice = env.user("alice");
    let log = env.dir.path().join("broker.log");
    // 512 descriptors, soft and hard, for 2 cores of 20000 connections.
    let b = env.broker_with(Some((&log, "info")), Some(512));
    let pid = b.child.id();
    wait_until("the lowered cap in the log", TIMEOUT, || {
        log_lines(
            &log,
            &["lowered broker.max_connections_per_core from 20000"],
        ) == 1
    });

    // 2,000 silent connections from 127.0.0.2, four times the limit.
    let (cpu0, lines0, t0) = (cpu_s(pid), all_log_lines(&log), Instant::now());
    let flood: Vec<TcpStream> = (0..2000)
        .filter_map(|_| connect_from("127.0.0.2", b.addr))
        .collect();
    assert!(
        flood.len() > 1500,
        "only {} connects went through",
        flood.len()
    );
    let served = Instant::now();
    released(&b, &alice, "alice");
    let served = served.elapsed();
    std::thread::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed()));
    let wall = t0.elapsed().as_secs_f64();
    let (cpu, lines) = (
        (cpu_s(pid) - cpu0) / wall,
        (all_log_lines(&log) - lines0) as f64 / wall,
    );
    eprintln!(
        "flood: {} connects, broker {:.0}% of a core, {lines:.1} log lines/s, terminal served in {served:?}",
        flood.len(),
        cpu * 100.0
    );
    assert!(cpu < 0.9, "the broker used {:.0}% of a core", cpu * 100.0);
    assert!(lines <= 3.0, "{lines:.1} log lines a second");
    assert!(
        served < Duration::from_secs(2),
        "terminal served in {served:?}"
    );
    assert!(fds(pid) < 512, "the broker holds {} descriptors", fds(pid));
}

#[test]
fn one_source_holding_silent_connections_does_not_lock_out_another() {
    let _serial = serial();
    // Without a per-source cap, 64 a core would all be the attacker's.
    let env = Env::with_broker(
        "max_connections_per_core = 64\nmax_pending_per_source = 8",
        "",
    );
    let alice = env.user("alice");
    let b = env.broker();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = b.addr;
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // 400 silent connections from 127.0.0.2, renewed every 500 ms,
            // for at most 5 s.
            let until = Instant::now() + Duration::from_secs(5);
            let mut opened = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let held: Vec<TcpStream> = (0..400)
                    .filter_map(|_| connect_from("127.0.0.2", addr))
                    .collect();
                opened += held.len();
                std::thread::sleep(Duration::from_millis(500));
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let t = Instant::now();
        released(&b, &alice, "alice");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "served in {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let opened = attacker.join().unwrap();
    assert!(opened >= 400, "the attacker opened {opened}");
    assert!(
        metric(
            b.admin,
            "keybroker_handshake_refused_total{reason=\"source_pending\"}"
        ) > 0.0
    );
}

/// The `q`-quantile of `v` (sorted in place), in ms.
fn quantile(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// The config's test `[auth]` lines replaced by `auth` (after `init`, so
/// `user add` hashes with the new parameters).
fn set_auth(env: &Env, auth: &str) {
    let text = std::fs::read_to_string(&env.config).unwrap();
    let old = format!("[auth]\nmax_failures = 3\nargon2_m_kib = 64\nargon2_t = 1\n{AUTH_RATE}");
    assert!(text.contains(&old));
    std::fs::write(
        &env.config,
        text.replace(&old, &format!("[auth]\n{auth}\n")),
    )
    .unwrap();
}

/// Login times of `u` on fresh (resumed) connections, the login alone.
fn login_times(b: &Broker, tc: &TerminalConfig, u: &str, n: usize) -> Vec<Duration> {
    let (p1, _) = pw(u);
    (0..n)
        .map(|_| {
            let mut t = b.connect(tc);
            let started = Instant::now();
            t.login(u, p1.as_bytes()).expect("login");
            let took = started.elapsed();
            std::thread::sleep(Duration::from_millis(250));
            took
        })
        .collect()
}

#[test]
fn one_terminal_looping_logins_does_not_hold_up_another_users_login() {
    let _serial = serial();
    let env = Env::new("");
    // The default argon2id parameters; alice logs in every 250 ms, within
    // a rate of 4 a second.
    set_auth(
        &env,
        "checks_per_terminal_per_s = 4\nchecks_burst_per_terminal = 10",
    );
    let alice = env.user("alice");
    let mallory = env.user("mallory");
    let b = env.broker();
    let mut unloaded = login_times(&b, &alice, "alice", 10);
    // Eight connections of one terminal from 127.0.0.2 looping logins, for
    // 8 s at most: made-up names, which cost an argon2id each (the dummy
    // hash) and lock nothing, so the loop never ends by itself. It ignores
    // the retry hint, but pauses 1 ms after a busy: spinning would measure
    // this shared test machine's CPU, not the auth pool.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, busy) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let attackers: Vec<_> = (0..8)
        .map(|i| {
            let (stop, ok, busy) = (stop.clone(), ok.clone(), busy.clone());
            let from: IpAddr = "127.0.0.2".parse().unwrap();
            let mut t = Terminal::connect_from(from, b.addr, &mallory, TIMEOUT).unwrap();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(8);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    n += 1;
                    match refused(t.login(&format!("mallory-{i}-{n}"), b"x")) {
                        ErrorCode::UnknownUser => ok.fetch_add(1, Ordering::Relaxed),
                        ErrorCode::Busy => {
                            std::thread::sleep(Duration::from_millis(1));
                            busy.fetch_add(1, Ordering::Relaxed)
                        }
                        code => panic!("{code}"),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Every one of alice's logins is served (login_times panics on a
    // refusal): the loop's busy answers are the loop's alone.
    let mut loaded = login_times(&b, &alice, "alice", 10);
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let (ok, busy) = (ok.load(Ordering::Relaxed), busy.load(Ordering::Relaxed));
    // Latency is not asserted: on this shared machine a timed bound fails
    // on the machine's load, not on the broker. Printed only to read.
    eprintln!(
        "login p99 unloaded {:.1} ms, under the loop {:.1} ms; attacker ok {ok}, busy {busy} in {secs:.1} s",
        quantile(&mut unloaded, 0.99),
        quantile(&mut loaded, 0.99)
    );
    assert!(busy > 0, "the looping terminal was never told busy");
    // What the loop got checked is its bucket: the burst, then 4 a second.
    let allowed = 10.0 + 4.0 * secs + 1.0;
    assert!(
        ok as f64 <= allowed,
        "the looping terminal had {ok} checks in {secs:.1} s, more than {allowed:.0}"
    );
}

#[test]
fn busy_from_a_rate_says_when_to_retry() {
    let env = Env::new("");
    set_auth(&env, "argon2_m_kib = 64\nargon2_t = 1");
    let alice = env.user("alice");
    let b = env.broker();
    // checks_burst_per_terminal = 10 by default: the 11th check at once
    // is refused before any argon2.
    let mut t = b.connect(&alice);
    let mut refused = None;
    for _ in 0..12 {
        match t.login("nobody", b"x") {
            Err(TerminalError::Refused {
                code: ErrorCode::Busy,
                detail,
            }) => {
                refused = Some(detail);
                break;
            }
            Err(TerminalError::Refused {
                code: ErrorCode::UnknownUser,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
    let detail = refused.expect("never busy");
    let ms: u64 = detail
        .strip_prefix("retry_after_ms=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry hint in {detail:?}"));
    assert!((1..=1000).contains(&ms), "{ms}");
}

#[test]
fn one_terminal_flooding_exchanges_does_not_lock_another_user_out() {
    let _serial = serial();
    let env = Env::new("[exchange]\nper_user_per_s = 200\nper_user_burst = 400\n");
    let alice = env.user("alice");
    let mallory = env.user("mallory");
    // A table of 600 and 300 a user: mallory's 900 accepted exchanges
    // would fill it without the quota.
    let _m = env.market_with(
        "m1",
        "*",
        "max_sessions = 600\nmax_sessions_per_user = 300",
        None,
    );
    let b = env.broker();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, busy) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hinted = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let mut t = released(&b, &mallory, "mallory");
            let (stop, ok, busy, hinted) = (stop.clone(), ok.clone(), busy.clone(), hinted.clone());
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(3);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    match t.exchange("m1") {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(TerminalError::Refused {
                            code: ErrorCode::Busy,
                            detail,
                        }) => {
                            busy.fetch_add(1, Ordering::Relaxed);
                            if detail.starts_with("retry_after_ms=") {
                                hinted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut a = released(&b, &alice, "alice");
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(2800) {
        a.exchange("m1").expect("alice's exchange during the flood");
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    a.exchange("m1").expect("alice's exchange after the flood");
    let (ok, busy, hinted) = (
        ok.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed),
        hinted.load(Ordering::Relaxed),
    );
    eprintln!("flood: mallory ok {ok}, busy {busy} ({hinted} with a hint); alice served {served}");
    assert!(
        ok > 600,
        "mallory got only {ok} sessions: the table never filled"
    );
    assert!(
        busy > 0 && hinted == busy,
        "{busy} busy, {hinted} with a retry hint"
    );
}

/// Presents one certificate whatever the key: rustls refuses to build a
/// client whose key does not match its certificate.
#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client presenting `cert` but signing with `key`, another key.
fn mismatched(
    roots: rustls::RootCertStore,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: &rcgen::KeyPair,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    let signer = provider.key_provider.load_private_key(der.into()).unwrap();
    let presents = Presents(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert],
        signer,
    )));
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(presents)),
    )
}

/// One way to get a handshake refused.
type Attempt<'a> = Box<dyn Fn() + 'a>;

/// Drives a TLS handshake with `cfg` to its end; the broker refuses it.
fn tls_attempt(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) {
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // TLS 1.3: the client finishes first, then reads the alert.
    let mut buf = [0u8; 64];
    loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[test]
fn every_refused_handshake_kind_is_counted_and_logged_once() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let env = Env::new("");
    let _alice = env.user("alice");
    let log = env.dir.path().join("broker.log");
    let b = env.broker_with(Some((&log, "info")), None);
    let roots = env.broker_roots();
    let identity = |cert: rustls::pki_types::CertificateDer<'static>, key: &KeyPair| {
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        TerminalConfig::new(roots.clone(), Some((vec![cert], key.into())))
            .unwrap()
            .client
    };
    // alice's real certificate, but signed for with another key.
    let alice_pem = std::fs::read(env.terminal_dir("alice").join("terminal.crt")).unwrap();
    let alice_cert = keybroker::pki::certs_pem(&alice_pem).unwrap().remove(0);
    let not_alices = KeyPair::generate().unwrap();
    // A terminal certificate from a CA of its own, and a self-signed one.
    let foreign_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let foreign = Issuer::new(ca_params, &foreign_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["terminal".into()])
        .unwrap()
        .signed_by(&leaf_key, &foreign)
        .unwrap();
    let self_key = KeyPair::generate().unwrap();
    let self_signed = CertificateParams::new(vec!["terminal".into()])
        .unwrap()
        .self_signed(&self_key)
        .unwrap();
    let tls12 = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth(),
    );
    let kinds: Vec<(&str, Attempt)> = vec![
        (
            "no_certificate",
            Box::new(|| {
                let anon = TerminalConfig::new(roots.clone(), None).unwrap();
                tls_attempt(b.addr, anon.client)
            }),
        ),
        ("unknown_ca", {
            let c = identity(leaf.der().clone(), &leaf_key);
            Box::new(move || tls_attempt(b.addr, c.clone()))
        }),
        ("unknown_ca", {
            let c = identity(self_signed.der().clone(), &self_key);
            Box::new(move || tls_attempt(b.addr, c.clone()))
        }),
        ("bad_certificate", {
            let c = mismatched(roots.clone(), alice_cert.clone(), &not_alices);
            Box::new(move || tls_attempt(b.addr, c.clone()))
        }),
        (
            "protocol",
            Box::new(move || tls_attempt(b.addr, tls12.clone())),
        ),
        (
            "closed",
            Box::new(|| drop(TcpStream::connect(b.addr).unwrap())),
        ),
    ];
    let series = |r: &str| format!("keybroker_handshake_refused_total{{reason=\"{r}\"}}");
    let before: Vec<f64> = kinds
        .iter()
        .map(|(r, _)| metric(b.admin, &series(r)))
        .collect();
    let before_timeout = metric(b.admin, &series("timeout"));
    // Three silent peers time out (2 s) while the others run.
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(b.addr).unwrap())
        .collect();
    for (_, attempt) in &kinds {
        for _ in 0..3 {
            attempt();
        }
    }
    wait_until("the silent peers' timeouts", TIMEOUT, || {
        metric(b.admin, &series("timeout")) - before_timeout >= 3.0
    });
    drop(silent);
    for ((reason, _), was) in kinds.iter().zip(&before) {
        let got = metric(b.admin, &series(reason)) - was;
        let tries = 3 * kinds.iter().filter(|(r, _)| r == reason).count();
        assert_eq!(got, tries as f64, "{reason}: counted {got}");
    }
    std::thread::sleep(Duration::from_millis(100));
    for (reason, _) in kinds
        .iter()
        .map(|(r, f)| (*r, f))
        .chain([("timeout", &kinds[0].1)])
    {
        let lines = log_lines(&log, &["TLS handshake refused", reason, "peer=127.0.0.1:"]);
        assert_eq!(
            lines,
            1,
            "{reason}: {lines} log lines in\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
}

/// Every file and directory under `dir` with group or world bits.
fn not_private(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let mode = std::fs::symlink_metadata(&d).unwrap().permissions().mode();
        if mode & 0o077 != 0 {
            out.push(format!("{} {:o}", d.display(), mode & 0o777));
        }
        if std::fs::symlink_metadata(&d).unwrap().is_dir() {
            todo.extend(std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn a_fresh_init_under_umask_022_leaves_nothing_group_or_world_readable() {
    use std::os::unix::process::CommandExt;
    let env = Env::new("");
    let fresh = env.dir.path().join("fresh");
    let cmd = |args: &[&str]| {
        let mut c = env.cmd(args);
        c.arg("--data-dir").arg(&fresh);
        // SAFETY: umask is one system call, safe between fork and exec.
        #[allow(unsafe_code)]
        unsafe {
            c.pre_exec(|| {
                rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
                Ok(())
            });
        }
        c
    };
    let run = |args: &[&str]| {
        let out = cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["init"]);
    // The demo users (their password files too), and the ledger opened.
    run(&["demo-enroll"]);
    run(&["wallet", "audit"]);
    // A running broker holds the databases open: their -wal and -shm exist.
    let mut serve = cmd(&["serve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(serve.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening"), "{line:?}");
    let made: Vec<_> = [
        "keybroker.db",
        "keybroker.db-wal",
        "keybroker.db-shm",
        "ledger.db",
        "ledger.db-wal",
        "demo/alice/access.pw",
        "hsm/user.pin",
    ]
    .into_iter()
    .filter(|f| !fresh.join(f).exists())
    .collect();
    let loose = not_private(&fresh);
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(made.is_empty(), "not made: {made:?}");
    assert!(loose.is_empty(), "readable by others: {loose:#?}");
}

#[test]
fn a_data_dir_others_can_write_is_refused_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("");
    let data = env.data();
    let chmod = |m| std::fs::set_permissions(&data, std::fs::Permissions::from_mode(m)).unwrap();
    chmod(0o777);
    for args in [&["user", "list"][..], &["serve"]] {
        let err = env.cmd(args).output().unwrap();
        let text = String::from_utf8_lossy(&err.stderr);
        assert!(!err.status.success(), "{args:?} ran on a 0777 data dir");
        assert!(
            text.contains(&format!(
                "{} is writable by group or others (mode 0777)",
                data.display()
            )),
            "{args:?}: {text}"
        );
    }
    // Readable by others: a warning naming it, and the command runs.
    chmod(0o755);
    let out = env.kb(&["user", "list"]).success();
    assert!(out.stderr().contains(&format!(
        "{} is readable by group or others",
        data.display()
    )));
    chmod(0o700);
    assert!(
        !env.kb(&["user", "list"])
            .success()
            .stderr()
            .contains("readable")
    );
}

#[test]
fn unknown_user_and_wrong_password_take_the_same_time() {
    let _serial = serial();
    let env = Env::new("");
    // 64 MiB, 2 passes (above the default 19 MiB): the check is what both
    // answers cost; only a wrong password also writes the failure counter,
    // an fsync that a disk busy with other tests can stretch to ~10 ms.
    set_auth(
        &env,
        "max_failures = 100\nchecks_per_terminal_per_s = 0\nargon2_m_kib = 65536",
    );
    let alice = env.user("alice");
    let b = env.broker();
    let mut t = b.connect(&alice);
    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    // Interleaved, so load on the machine falls on both alike.
    for _ in 0..15 {
        let s = Instant::now();
        assert_eq!(refused(t.login("nobody", b"x")), ErrorCode::UnknownUser);
        unknown.push(s.elapsed());
        let s = Instant::now();
        assert_eq!(refused(t.login("alice", b"x")), ErrorCode::WrongPassword);
        wrong.push(s.elapsed());
    }
    let (u, w) = (quantile(&mut unknown, 0.5), quantile(&mut wrong, 0.5));
    eprintln!("median unknown_user {u:.2} ms, wrong_password {w:.2} ms");
    assert!(
        (u - w).abs() <= 0.2 * w.max(u),
        "unknown_user {u:.2} ms, wrong_password {w:.2} ms"
    );
}
