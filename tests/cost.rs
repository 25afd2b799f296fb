//! What a login and a release cost, measured by hand (`#[ignore]`d):
//!
//! ```sh
//! KB_BEFORE=/path/to/an/older/keybroker KB_N=200 \
//!     cargo test --test cost -- --ignored --nocapture
//! ```
//!
//! Starts a broker of this build and, with `KB_BEFORE`, one of the older
//! binary, each on its own data dir with the same argon2id cost, and
//! drives them in turn, in batches, from one terminal each: every
//! iteration connects (not counted), logs in, releases and logs out. It
//! prints per operation the wall time the terminal waited and the CPU
//! the broker process spent (all its threads, from
//! `/proc/PID/task/*/schedstat`), as medians over the batches.
//! `hsm.key_linger_s = 0`, so every release unwraps the key in the HSM:
//! the dearest release; with the default linger a returning user's
//! release skips the unwrap.

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

fn node(name: &str, bin: &Path, m_kib: u32, t: u32) -> Node {
    let env = Env::of(bin, |data| {
        format!(
            "data_dir = {data:?}\n[hsm]\nkey_linger_s = 0\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:0\"\ncores = 2\n\
             [auth]\nmax_failures = 3\nargon2_m_kib = {m_kib}\nargon2_t = {t}\n"
        )
    });
    let tc = env.user("u");
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
    let (p1, p2) = pw("u");
    let pid = node.broker.child.id();
    let mut sums = [Duration::ZERO; 2];
    let mut cpu = [0u64; 2];
    for _ in 0..n {
        let mut t = node.broker.connect(&node.tc);
        // Let the handshake's tail (tickets) finish on the broker.
        std::thread::sleep(Duration::from_millis(2));
        let c0 = cpu_ns(pid);
        let t0 = Instant::now();
        t.login("u", p1.as_bytes()).expect("login");
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
    let params: Vec<(u32, u32)> = std::env::var("KB_ARGON2")
        .unwrap_or("19456:2,64:1".into())
        .split(',')
        .map(|p| {
            let (m, t) = p.split_once(':').unwrap();
            (m.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    for (m_kib, t) in params {
        let mut nodes = vec![node("this build", BIN.as_ref(), m_kib, t)];
        if let Ok(before) = std::env::var("KB_BEFORE") {
            nodes.insert(0, node("before", before.as_ref(), m_kib, t));
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
