//! What a login and a release cost, measured by hand (`#[ignore]`d):
//!
//! ```sh
//! KB_BEFORE=/path/to/an/older/keybroker KB_N=200 \
//!     cargo test --test cost -- --ignored --nocapture
//! ```
//!
//! Starts a broker of this build (or of the binary `KB_AFTER` names, a
//! release build of it, say) and, with `KB_BEFORE`, one of the older
//! binary, each on its own data dir with the same argon2id cost, and
//! drives them in turn, in batches, from one terminal each: every
//! iteration connects (not counted), logs in, releases and logs out. It
//! prints per operation the wall time the terminal waited and the CPU
//! the broker process spent (all its threads, from
//! `/proc/PID/task/*/schedstat`), as medians over the batches.
//! `hsm.key_linger_s = 0` unless `KB_LINGER` says otherwise, so every
//! release unwraps the key in the HSM: the dearest release; with a linger
//! a returning user's release skips the unwrap. `KB_ARGON2` lists the
//! argon2id costs to run, `m_kib:t,...` (default `19456:2,64:1`). This
//! build's broker gets the tests' check rate (`AUTH_RATE`); an older
//! binary that has one gets it from `KB_BEFORE_AUTH`.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Nanoseconds of CPU the process has run, over all its threads.
fn cpu_ns(pid: u32) -> u64 {
    let mut ns = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat =
            std::fs::read_to_string(task.unwrap().path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns
}

struct Node {
    name: String,
    _env: Env,
    broker: Broker,
    tc: keybroker::terminal::TerminalConfig,
}

/// `auth`: more `[auth]` lines (this build's check rate, which an older
/// binary may not know).
fn node(name: &str, bin: &Path, m_kib: u32, t: u32, linger_s: u64, auth: &str) -> Node {
    let env = Env::of(bin, |data| {
        format!(
            "data_dir = {data:?}\n[hsm]\nkey_linger_s = {linger_s}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:0\"\ncores = 2\n\
             [auth]\nmax_failures = 3\nargon2_m_kib = {m_kib}\nargon2_t = {t}\n{auth}"
        )
    });
    let tc = env.user("carol");
    let broker = env.broker();
    Node {
        name: name.into(),
        _env: env,
        broker,
        tc,
    }
}

/// Per operation over `n` iterations: (login wall, release wall, login
/// CPU, release CPU), in µs.
fn batch(node: &Node, n: usize) -> [f64; 4] {
    let (p1, p2) = pw("carol");
    let pid = node.broker.child.id();
    let mut sums = [Duration::ZERO; 2];
    let mut cpu = [0u64; 2];
    for _ in 0..n {
        let mut t = node.broker.connect(&node.tc);
        // Let the handshake's tail (tickets) finish on the broker.
        std::thread::sleep(Duration::from_millis(2));
        let c0 = cpu_ns(pid);
        let t0 = Instant::now();
        t.login("carol", p1.as_bytes()).expect("login");
        let t1 = Instant::now();
        let c1 = cpu_ns(pid);
        t.release(p2.as_bytes()).expect("release");
        let t2 = Instant::now();
        let c2 = cpu_ns(pid);
        t.logout().unwrap();
        sums[0] += t1 - t0;
        sums[1] += t2 - t1;
        cpu[0] += c1 - c0;
        cpu[1] += c2 - c1;
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    [
        per(sums[0]),
        per(sums[1]),
        cpu[0] as f64 / 1e3 / n as f64,
        cpu[1] as f64 / 1e3 / n as f64,
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "a measurement, run by hand"]
fn login_and_release_cost() {
    let n: usize = std::env::var("KB_N").map_or(200, |v| v.parse().unwrap());
    let rounds: usize = std::env::var("KB_ROUNDS").map_or(5, |v| v.parse().unwrap());
    let linger_s: u64 = std::env::var("KB_LINGER").map_or(0, |v| v.parse().unwrap());
    let params: Vec<(u32, u32)> = std::env::var("KB_ARGON2")
        .unwrap_or("19456:2,64:1".into())
        .split(',')
        .map(|p| {
            let (m, t) = p.split_once(':').unwrap();
            (m.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    for (m_kib, t) in params {
        let after = std::env::var("KB_AFTER").unwrap_or(BIN.into());
        let mut nodes = vec![node(
            "this build",
            after.as_ref(),
            m_kib,
            t,
            linger_s,
            AUTH_RATE,
        )];
        if let Ok(before) = std::env::var("KB_BEFORE") {
            let auth = std::env::var("KB_BEFORE_AUTH").unwrap_or_default();
            nodes.insert(
                0,
                node("before", before.as_ref(), m_kib, t, linger_s, &auth),
            );
        }
        for n in &nodes {
            batch(n, 10); // warm up: caches, prepared statements, key handles
        }
        let mut results: Vec<Vec<[f64; 4]>> = vec![Vec::new(); nodes.len()];
        for round in 0..rounds {
            // Alternate the order, so neither is always first after a pause.
            for i in 0..nodes.len() {
                let i = if round % 2 == 0 {
                    i
                } else {
                    nodes.len() - 1 - i
                };
                results[i].push(batch(&nodes[i], n));
            }
        }
        println!("argon2id m={m_kib} KiB t={t}, {rounds} batches of {n} (medians, µs per op)");
        println!(
            "  {:<12} {:>10} {:>10} {:>10} {:>10}",
            "", "login", "release", "login", "release"
        );
        println!(
            "  {:<12} {:>10} {:>10} {:>10} {:>10}",
            "", "wall", "wall", "cpu", "cpu"
        );
        for (node, r) in nodes.iter().zip(&results) {
            let col = |k: usize| median(r.iter().map(|b| b[k]).collect());
            println!(
                "  {:<12} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                node.name,
                col(0),
                col(1),
                col(2),
                col(3)
            );
        }
    }
}

/// Nanoseconds of CPU this thread has run (SoftHSM runs in it).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The HSM's share, in this process on the real token: what the release
/// unwrapped with before (the master key) and what it does now (the
/// verifier, the KEK derived, the unwrap, both destroyed), and one row MAC.
/// Thread CPU per call, the median of 7 rounds of `n` each, the items
/// taking turns within each round.
#[test]
#[ignore = "a measurement, run by hand"]
fn hsm_costs() {
    use keybroker::hsm::ops;
    use keybroker::rowmac::RowMac;
    let hsm = shared_hsm();
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();
    let secret = keybroker::passwords::Binding::new(64, 1)
        .unwrap()
        .card_secret(b"pw", "u")
        .unwrap();
    let (_, legacy) = ops::generate_wrapped_user_key(&s, keys.master_wrap).unwrap();
    let (_, bound, verifier) = ops::generate_bound_user_key(&s, &keys, &secret.kek_data).unwrap();
    let mac = keybroker::rowmac::HsmRowMac::new(hsm.clone()).unwrap();
    let row = vec![7u8; 1200]; // about a user row: its certificate is most of it
    type Item<'a> = (&'a str, Box<dyn FnMut() + 'a>);
    let mut items: Vec<Item> = vec![
        (
            "release before: unwrap under kb-master-wrap + destroy",
            Box::new(|| {
                let k = ops::unwrap_user_key(&s, keys.master_wrap, &legacy).unwrap();
                ops::destroy(&s, k).unwrap();
            }),
        ),
        (
            "release now: verifier + KEK derive + unwrap + destroy both",
            Box::new(|| {
                let k = ops::open_bound_user_key(&s, &keys, &secret.kek_data, &verifier, &bound)
                    .unwrap()
                    .unwrap();
                ops::destroy(&s, k).unwrap();
            }),
        ),
        (
            "a wrong second password (the verifier only)",
            Box::new(|| {
                let r = ops::open_bound_user_key(&s, &keys, &[0; 32], &verifier, &bound).unwrap();
                assert!(r.is_err());
            }),
        ),
        (
            "KEK derive + destroy",
            Box::new(|| {
                let k = ops::derive_kek(&s, keys.kek_base, &secret.kek_data, ops::KekUse::Unwrap)
                    .unwrap();
                ops::destroy(&s, k).unwrap();
            }),
        ),
        (
            "row MAC of 1200 bytes (kb-registry-mac)",
            Box::new(|| {
                std::hint::black_box(mac.mac(&row).unwrap());
            }),
        ),
    ];
    // schedstat moves in scheduler ticks (4 ms here): many calls a round.
    let n = 1000;
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); items.len()];
    for _ in 0..7 {
        for (i, (_, f)) in items.iter_mut().enumerate() {
            let c = thread_cpu_ns();
            for _ in 0..n {
                f();
            }
            per[i].push((thread_cpu_ns() - c) as f64 / 1e3 / n as f64);
        }
    }
    println!("HSM, thread CPU µs per call (median of 7 rounds of {n}):");
    for ((name, _), v) in items.iter().zip(per) {
        println!("  {name:<60} {:>8.1}", median(v));
    }
}
