//! Metrics and health against the real broker, checked by the real
//! Prometheus tools (Debian's `prometheus` package: promtool and the server).

mod common;

use common::*;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{tool} not found: `make deps` installs Debian's prometheus package"
    );
}

/// Some load: logins, a wrong password, exchanges in both modes.
fn load(env: &Env, b: &Broker, tc: &keybroker::terminal::TerminalConfig) {
    let mut t = b.connect(tc);
    let _ = t.login("alice", b"wrong");
    drop(t);
    let mut t = released(b, tc, "alice");
    for _ in 0..5 {
        t.exchange("m1").unwrap();
        t.exchange_partial("m1").unwrap();
    }
    let _ = env;
}

#[test]
fn metrics_are_promtool_clean_and_health_endpoints_answer() {
    require("promtool");
    let env = Env::new("");
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let b = env.broker();
    load(&env, &b, &alice);
    assert_eq!(get(b.admin, "/healthz").0, 200);
    assert_eq!(get(b.admin, "/readyz").0, 200);
    assert_eq!(get(b.admin, "/nope").0, 404);
    let (status, metrics) = get(b.admin, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "keybroker_exchange_duration_seconds_bucket{kx=\"software\"",
        "keybroker_exchange_duration_seconds_count{kx=\"partial\"}",
        "keybroker_handshake_duration_seconds_count",
        "keybroker_hsm_operation_duration_seconds_count{op=\"sign\"}",
        "keybroker_pool_queue_wait_seconds_count{pool=\"hsm\"}",
        "keybroker_market_round_trip_seconds_count",
        "keybroker_market_batch_size_count",
        "keybroker_market_up{market=\"m1\"} 2",
        "keybroker_errors_total{code=\"wrong_password\"} 1",
        "keybroker_connections{core=\"0\"}",
        "keybroker_hsm_up",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    // Ten exchanges, counted once each across the two cores.
    let count: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("keybroker_exchange_duration_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(count, 10.0);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    require("promtool");
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("promtool")
        .args([
            "test",
            "rules",
            &format!("{root}/ops/prometheus/alerts_test.yml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The query without a trailing comparison: an alert's condition filters
/// its series away when healthy, but the series it watches must exist.
fn watched(expr: &str) -> String {
    for op in [" > ", " < ", " == ", " >= ", " <= ", " != "] {
        if let Some(i) = expr.rfind(op) {
            let rhs = expr[i + op.len()..].trim();
            if rhs.parse::<f64>().is_ok() {
                return expr[..i].trim().to_owned();
            }
        }
    }
    expr.to_owned()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_and_every_dashboard_and_alert_query_returns_data() {
    require("prometheus");
    let env = Env::new("");
    let alice = env.user("alice");
    let _m = env.market("m1", "*");
    let b = env.broker();
    let dir = env.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: keybroker\n    static_configs:\n      - targets: ['{}']\n",
            b.admin
        ),
    )
    .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .expect("start prometheus");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(std::mem::replace(
        &mut prom,
        Command::new("true").spawn().unwrap(),
    ));
    // Load while Prometheus scrapes, bounded in time.
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        load(&env, &b, &alice);
        std::thread::sleep(Duration::from_millis(200));
    }
    let up = |q: &str| {
        let (status, body) = get(web, &format!("/api/v1/query?query={}", urlencode(q)));
        (status, body)
    };
    let (_, body) = up("up{job=\"keybroker\"}");
    assert!(
        body.contains("\"1\""),
        "Prometheus did not scrape the broker: {body}"
    );
    let script = format!("{}/ops/check-queries.sh", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("sh").arg(&script).output().unwrap();
    assert!(out.status.success(), "check-queries.sh failed");
    let queries = String::from_utf8(out.stdout).unwrap();
    let mut empty = Vec::new();
    let mut n = 0;
    for q in queries.lines().filter(|l| !l.trim().is_empty()) {
        n += 1;
        let q = watched(q);
        let (status, body) = up(&q);
        assert_eq!(status, 200, "{q}: {body}");
        if body.contains("\"result\":[]") {
            empty.push(q);
        }
    }
    assert!(n > 20, "too few queries found: {n}");
    assert!(
        empty.is_empty(),
        "queries with no data:\n{}",
        empty.join("\n")
    );
}
