//! Metrics and health against the real broker, checked by the real
//! Prometheus tools (Debian's `prometheus` package: promtool and the server),
//! and the dashboard checked against Grafana's schema (its foundation SDK).

mod common;

use common::relay::{Relay, free_port};
use common::*;
use keybroker::proto::ErrorCode;
use keybroker::terminal::{Direct, TerminalConfig};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// A real Prometheus scraping the broker's admin port every second, with
/// its data under `dir`.
struct Prometheus {
    child: std::process::Child,
    web: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &std::path::Path, target: SocketAddr) -> Self {
        require("prometheus");
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: keybroker\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // Prometheus does not say which port it got for :0, so it gets one
        // that was free a moment ago.
        let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("prometheus")
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
        let p = Self { child, web };
        wait_until("Prometheus to scrape the broker", TIMEOUT * 3, || {
            p.try_query("up{job=\"keybroker\"} == 1")
                .is_some_and(|r| !r.is_empty())
        });
        p
    }

    /// The result of an API call, `None` until Prometheus answers.
    fn try_api(&self, path: &str) -> Option<serde_json::Value> {
        TcpStream::connect_timeout(&self.web, Duration::from_millis(200)).ok()?;
        let (status, body) = get(self.web, path);
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(v["status"], "success", "{path}: {body}");
        Some(v["data"]["result"].clone())
    }

    fn try_query(&self, q: &str) -> Option<Vec<serde_json::Value>> {
        let r = self.try_api(&format!("/api/v1/query?query={}", urlencode(q)))?;
        r.as_array().cloned()
    }

    /// Every series of `q` over `[start, end]` (Unix seconds), a point a
    /// second: each series is the list of its values.
    fn range(&self, q: &str, start: f64, end: f64) -> Vec<Vec<f64>> {
        let r = self
            .try_api(&format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
                urlencode(q)
            ))
            .unwrap_or_else(|| panic!("Prometheus stopped answering at {q}"));
        r.as_array()
            .unwrap()
            .iter()
            .map(|series| {
                series["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p[1].as_str().unwrap().parse::<f64>().unwrap())
                    .collect()
            })
            .collect()
    }
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
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

/// Series only a fault from outside the broker moves, with the reason: the
/// test asks them for data but not for movement.
const MOVED_ONLY_FROM_OUTSIDE: &[(&str, &str)] = &[(
    "keybroker_accept_failures_total",
    "accept fails for want of descriptors (EMFILE), but the broker caps its \
     connections below its descriptor limit (tests/adversarial.rs), so only \
     descriptors taken by something else make it fail",
)];

fn decision_of(receipt: &[u8]) -> String {
    keybroker::receipt::SignedReceipt::decode(receipt)
        .unwrap()
        .receipt
        .decision_id
}

/// The wallet's day: logins, exchanges on two markets in both modes, a
/// top-up, a purchase mailed through the relay, its cancel; and every
/// refusal and fault a dashboard panel or an alert watches for. The relay
/// is stopped last, so the last notification fails and waits.
fn workload(
    env: &Env,
    issuer: &std::path::Path,
    b: &Broker,
    relay: Relay,
    t: &[TerminalConfig; 4],
) {
    let [alice, carol, dave, _] = t;
    let (_, a2) = pw("alice");
    let mut a = released(b, alice, "alice");
    a.top_up(&voucher(env, issuer, "alice", 10_000, "v1"), a2.as_bytes())
        .unwrap();
    for _ in 0..5 {
        a.exchange("m1").unwrap();
        a.exchange_partial("m1").unwrap();
        a.exchange("m2").unwrap();
    }
    let (_, receipt) = a.purchase("m1", 2_500, "EUR", "order 1", "k1").unwrap();
    let decision = decision_of(&receipt);
    // The market learns of the purchase from its receipt, then authorises
    // the cancel.
    let mut market = Direct::connect(&a.exchange("m1").unwrap(), TIMEOUT).unwrap();
    assert_eq!(market.present_receipt(&receipt).unwrap(), decision);
    let auth = market.cancel_authorisation(&decision).unwrap();
    assert_eq!(a.cancel(&decision, auth).unwrap(), 10_000);
    // Logged in already: unexpected (an alert watches internal|unexpected).
    assert_eq!(
        refused(a.login("alice", pw("alice").0.as_bytes())),
        ErrorCode::Unexpected
    );
    // The market closes its idle channel (idle_timeout_ms below); the next
    // exchange finds it broken and is asked again on a new one.
    let retried = || metric(b.admin, "keybroker_exchange_retried_total{market=\"m1\"}");
    let before = retried();
    std::thread::sleep(Duration::from_millis(1_500));
    a.exchange("m1").unwrap();
    assert_eq!(retried(), before + 1.0);
    drop(a);

    // A second session resumes with a ticket.
    released(b, alice, "alice").exchange("m1").unwrap();
    // A wrong password, then a lockout; alice's terminal for bob.
    let mut d = b.connect(dave);
    assert_eq!(refused(d.login("dave", b"wrong")), ErrorCode::WrongPassword);
    let _ = d.login("dave", b"wrong");
    let _ = d.login("dave", b"wrong");
    assert!(metric(b.admin, "keybroker_lockouts_total") >= 1.0);
    assert_eq!(
        refused(b.connect(alice).login("bob", pw("bob").0.as_bytes())),
        ErrorCode::WrongTerminal
    );
    // Carol logs in faster than her terminal's check rate: busy.
    let busy = (0..200).any(|_| {
        let r = b.connect(carol).login("carol", pw("carol").0.as_bytes());
        r.as_ref().err().and_then(|e| e.code()) == Some(ErrorCode::Busy)
    });
    assert!(busy, "200 logins at once and never busy");
    // A terminal without a certificate.
    let anon = TerminalConfig::new(rustls_roots(env), None).unwrap();
    let _ = keybroker::terminal::Terminal::connect(b.addr, &anon, TIMEOUT)
        .and_then(|mut t| t.login("alice", b"x"));
    // More connections than 2 cores x max_connections_per_core hold.
    let flood: Vec<TcpStream> = (0..16)
        .filter_map(|_| TcpStream::connect(b.addr).ok())
        .collect();
    wait_until("a connection refused at the limit", TIMEOUT, || {
        metric(b.admin, "keybroker_connections_refused_total") > 0.0
    });
    drop(flood);
    wait_until("the flood to drain", TIMEOUT, || {
        let (_, m) = get(b.admin, "/metrics");
        m.lines()
            .filter(|l| l.starts_with("keybroker_connections{"))
            .all(|l| l.ends_with(" 0"))
    });

    // The HSM loses every session and comes back.
    assert_eq!(http(b.admin, "POST", "/fault/hsm-sessions").0, 200);
    let mut a = b.connect(alice);
    a.login("alice", pw("alice").0.as_bytes()).unwrap();
    let _ = a.release(a2.as_bytes());
    wait_until("/readyz after the HSM fault", TIMEOUT * 2, || {
        get(b.admin, "/readyz").0 == 200
    });
    let mut a = released(b, alice, "alice");
    a.exchange("m1").unwrap();

    // The relay goes away: the next notification fails and waits.
    let sent = relay.messages().len();
    assert!(sent >= 3, "top-up, purchase and cancel mailed: {sent}");
    drop(relay);
    a.purchase("m1", 100, "EUR", "order 2", "k2").unwrap();
    wait_until("a failed delivery", TIMEOUT, || {
        metric(b.admin, "keybroker_mail_failures_total") > 0.0
    });
}

/// The CA the terminals trust, to build one without a certificate.
fn rustls_roots(env: &Env) -> rustls::RootCertStore {
    env.broker_roots()
}

#[test]
fn every_dashboard_and_alert_query_moves_under_a_real_workload() {
    let port = free_port();
    let (env, issuer) = wallet_env(Some(port), "max_connections_per_core = 4");
    let relay = Relay::start(port, &env.dir.path().join("relay"));
    // The HSM fault endpoint; the default check rate, which carol
    // outruns; channels that go idle and break unseen (tests/exchange.rs).
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[admin]\n", "[admin]\nfault_injection = true\n")
        .replace(AUTH_RATE, "");
    std::fs::write(
        &env.config,
        format!("{config}\n[exchange]\nkeepalive_ms = 600000\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n"),
    )
    .unwrap();
    let terminals = ["alice", "carol", "dave", "bob"].map(|u| env.user(u));
    let _m1 = env.market_with("m1", "*", "idle_timeout_ms = 1000\n", None);
    let _m2 = env.market("m2", "*");
    let b = env.broker();
    let prom = Prometheus::start(&env.dir.path().join("prometheus"), b.admin);

    let start = now_s();
    workload(&env, &issuer, &b, relay, &terminals);
    // Every change is in Prometheus once it scraped after the workload.
    let end = now_s();
    wait_until("a scrape after the workload", TIMEOUT, || {
        prom.try_query("timestamp(up{job=\"keybroker\"})")
            .and_then(|r| r.first()?["value"][1].as_str()?.parse::<f64>().ok())
            .is_some_and(|t| t > end + 1.0)
    });
    let end = now_s();

    // Every query of the dashboard, with its variables set to this broker
    // as Grafana would, and every alert expression.
    let script = format!("{}/ops/check-queries.sh", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("sh")
        .arg(&script)
        .arg("--source")
        .args(["--var", &format!("instance={}", b.admin)])
        .args(["--var", "job=keybroker", "--var", "market=m1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-queries.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queries = String::from_utf8(out.stdout).unwrap();
    let mut bad = Vec::new();
    let mut n = 0;
    for line in queries.lines().filter(|l| !l.trim().is_empty()) {
        let (source, expr) = line.split_once('\t').unwrap();
        n += 1;
        let q = watched(expr);
        let series = prom.range(&q, start, end);
        let values: Vec<f64> = series.iter().flatten().copied().collect();
        let exempt = MOVED_ONLY_FROM_OUTSIDE.iter().any(|(m, _)| q.contains(m));
        // A rate or an increase is above zero somewhere if its counter
        // moved; a gauge only has to have a value.
        let counted = q.contains("rate(") || q.contains("increase(");
        let why = if series.is_empty() {
            "no series"
        } else if !values.iter().any(|v| v.is_finite()) {
            "only NaN"
        } else if counted && !exempt && !values.iter().any(|&v| v.is_finite() && v > 0.0) {
            "never moved"
        } else {
            continue;
        };
        bad.push(format!("{why}: {source}\n    {q}"));
    }
    assert!(n > 40, "too few queries found: {n}");
    assert!(bad.is_empty(), "queries failing:\n{}", bad.join("\n"));

    // And every family the broker exports is watched by one of them.
    let (_, metrics) = get(b.admin, "/metrics");
    let unwatched: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("keybroker_") || PROCESS.contains(name))
        .filter(|name| !queries.contains(name))
        .collect();
    assert!(
        unwatched.is_empty(),
        "exported, but no panel or alert reads: {unwatched:?}"
    );
    for name in PROCESS {
        assert!(metrics.contains(name), "no {name} in /metrics");
    }
    let commit = metrics
        .lines()
        .find(|l| l.starts_with("keybroker_build_info{"))
        .expect("keybroker_build_info");
    assert!(
        commit.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{commit}"
    );
}

/// The process metrics an operator needs: CPU, memory, descriptors, threads.
const PROCESS: [&str; 5] = [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_threads",
];

#[test]
fn the_dashboard_is_what_its_script_builds_and_in_grafanas_schema() {
    let script = format!("{}/ops/grafana/dashboard.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .args([script.as_str(), "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ops/grafana/dashboard.py --check (`make deps` installs grafana-foundation-sdk):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
