//! Test harness: a real SoftHSM token and SQLite file in a temporary data
//! directory, the real `keybroker` binary, and the terminal library.
#![allow(dead_code)]

pub mod pg;
pub mod relay;
pub mod wallet;

use keybroker::terminal::{Terminal, TerminalConfig, TerminalError};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_keybroker");
/// Tests reconnect and log in with one terminal many times a second: its
/// check rate is raised (tests/adversarial.rs tests the default).
pub const AUTH_RATE: &str = "checks_per_terminal_per_s = 1000\nchecks_burst_per_terminal = 1000\n";
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The `keybroker` binary the commands run: this build's, unless made
    /// with [`Env::of`].
    pub bin: PathBuf,
}

pub struct Broker {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    /// Stops the broker as systemd does (SIGTERM) and returns how it ended.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // `Drop` afterwards finds the child reaped and sends nothing.
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let until = std::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < until,
                "the broker ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn connect(&self, tc: &TerminalConfig) -> Terminal {
        Terminal::connect(self.addr, tc, TIMEOUT).expect("connect")
    }
}

/// Passwords of test user `u`.
pub fn pw(u: &str) -> (String, String) {
    (format!("{u}-first"), format!("{u}-second"))
}

impl Env {
    /// A data directory with an initialised token and `extra` config lines.
    pub fn new(extra: &str) -> Self {
        Self::with_broker("", extra)
    }

    /// As [`Env::new`], with `broker` lines added to the `[broker]` table.
    pub fn with_broker(broker: &str, extra: &str) -> Self {
        Self::of(BIN.as_ref(), |data| {
            format!(
                "data_dir = {data:?}\n{extra}\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:0\"\ncores = 2\nhandshake_timeout_ms = 2000\nidle_timeout_ms = 3000\nframe_timeout_ms = 1500\n{broker}\n\
                 [auth]\nmax_failures = 3\nargon2_m_kib = 64\nargon2_t = 1\n{AUTH_RATE}"
            )
        })
    }

    /// A data directory initialised by the binary `bin`, with the config
    /// `config(data_dir)`.
    pub fn of(bin: &Path, config: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keybroker.toml");
        std::fs::write(&path, config(&dir.path().join("var"))).unwrap();
        let env = Self {
            dir,
            config: path,
            bin: bin.to_path_buf(),
        };
        env.kb(&["init"]).success();
        env
    }

    /// The broker CA the terminals trust (alice's copy), as rustls roots.
    pub fn broker_roots(&self) -> rustls::RootCertStore {
        let pem = std::fs::read(self.terminal_dir("alice").join("broker-ca.crt")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in keybroker::pki::certs_pem(&pem).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("var")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config").arg(&self.config).args(args);
        c.env_remove("SOFTHSM2_CONF")
            .env_remove("KEYBROKER_HSM_PIN");
        c
    }

    /// Runs the CLI with `input` on stdin.
    pub fn kb_in(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keybroker");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Output(out)
    }

    pub fn kb(&self, args: &[&str]) -> Output {
        self.kb_in(args, "")
    }

    /// Adds user `u` with its test passwords and enrols one terminal.
    pub fn user(&self, u: &str) -> TerminalConfig {
        let (p1, p2) = pw(u);
        self.kb_in(
            &["user", "add", u, "--mail", &format!("{u}@example.org")],
            &format!("{p1}\n{p2}\n"),
        )
        .success();
        self.terminal(u, u)
    }

    /// Enrols another terminal for `u` into directory `name`.
    pub fn terminal(&self, u: &str, name: &str) -> TerminalConfig {
        let out = self.dir.path().join("terminals").join(name);
        self.kb(&["terminal", "enroll", u, "--out", out.to_str().unwrap()])
            .success();
        TerminalConfig::load(&out).expect("terminal config")
    }

    pub fn terminal_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("terminals").join(name)
    }

    /// `keybroker terminal CMD` as user `u` on its terminal against `b`,
    /// its test passwords on stdin, then `rest`.
    pub fn terminal_cli(&self, b: &Broker, u: &str, cmd: &str, rest: &[&str]) -> Output {
        let (p1, p2) = pw(u);
        let (dir, broker) = (self.terminal_dir(u), b.addr.to_string());
        let mut args = vec!["terminal", cmd, "--dir", path_str(&dir), "--user", u];
        args.extend_from_slice(&["--broker", &broker]);
        args.extend_from_slice(rest);
        self.kb_in(&args, &format!("{p1}\n{p2}\n"))
    }

    /// Starts `keybroker serve` and waits for its `listening` line.
    pub fn broker(&self) -> Broker {
        self.broker_logging(None)
    }

    /// Starts the broker at debug log level, its log written to `log`.
    pub fn broker_logging(&self, log: Option<&Path>) -> Broker {
        self.broker_with(log.map(|p| (p, "debug")), None)
    }

    /// Starts the broker with its log at `level` written to a file, and its
    /// descriptor limit (soft and hard) set to `nofile` before it runs.
    pub fn broker_with(&self, log: Option<(&Path, &str)>, nofile: Option<u64>) -> Broker {
        let mut cmd = self.cmd(&["serve"]);
        cmd.stdout(Stdio::piped());
        match log {
            Some((p, level)) => {
                cmd.env("RUST_LOG", level)
                    .stderr(std::fs::File::create(p).unwrap());
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = rustix::process::Rlimit {
                current: Some(n),
                maximum: Some(n),
            };
            // SAFETY: setrlimit is one system call, safe between fork and exec.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || {
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, lim)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn broker");
        let (addr, admin) = listening(&mut child, "broker");
        Broker { child, addr, admin }
    }
}

/// A reference market run by the real binary.
pub struct Market {
    pub child: Child,
    pub addr: SocketAddr,
    pub direct: SocketAddr,
    pub config: PathBuf,
}

impl Drop for Market {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Market {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
        if sig == "-STOP" {
            self.wait_stopped();
        }
    }

    /// Waits until every thread of the market is stopped. `kill` returns
    /// once the signal is queued; the kernel stops the threads only as each
    /// is next scheduled, so on a loaded machine a market thread can still
    /// answer an exchange for a while after `kill -STOP`.
    fn wait_stopped(&self) {
        let tasks = format!("/proc/{}/task", self.child.id());
        let stopped = || {
            std::fs::read_dir(&tasks).unwrap().all(|t| {
                let stat =
                    std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
        };
        wait_until(
            "the market's threads to stop",
            Duration::from_secs(10),
            stopped,
        );
    }
}

impl Env {
    /// Creates market `id` (allowing `allow`), starts it on free ports and
    /// registers it with the broker's registry.
    pub fn market(&self, id: &str, allow: &str) -> Market {
        self.market_with(id, allow, "", None)
    }

    /// As [`Env::market`], with `extra` lines appended to its market.toml
    /// and its log (stderr) written to `log`.
    pub fn market_with(&self, id: &str, allow: &str, extra: &str, log: Option<&Path>) -> Market {
        let dir = self.dir.path().join("markets").join(id);
        self.kb(&[
            "market",
            "init",
            "--dir",
            path_str(&dir),
            "--id",
            id,
            "--listen",
            "127.0.0.1:0",
            "--direct-listen",
            "127.0.0.1:0",
            "--allow",
            allow,
        ])
        .success();
        let config = dir.join("market.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{text}\n{extra}\n")).unwrap();
        let m = self.start_market_logging(&config, log);
        self.kb(&[
            "market",
            "add",
            id,
            "--endpoint",
            &m.addr.to_string(),
            "--ca",
            path_str(&dir.join("market-ca.crt")),
        ])
        .success();
        // From now on the market restarts on the same ports.
        let text = std::fs::read_to_string(&m.config)
            .unwrap()
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{}\"", m.addr),
                1,
            )
            .replacen(
                "direct_listen = \"127.0.0.1:0\"",
                &format!("direct_listen = \"{}\"", m.direct),
                1,
            );
        std::fs::write(&m.config, text).unwrap();
        m
    }

    pub fn start_market(&self, config: &Path) -> Market {
        self.start_market_logging(config, None)
    }

    pub fn start_market_logging(&self, config: &Path, log: Option<&Path>) -> Market {
        let stderr = log.map_or_else(Stdio::inherit, |p| {
            Stdio::from(std::fs::File::create(p).expect("market log"))
        });
        let mut child = Command::new(BIN)
            .args(["market", "serve", "--market-config", path_str(config)])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn market");
        let (addr, direct) = listening(&mut child, "market");
        Market {
            child,
            addr,
            direct,
            config: config.to_path_buf(),
        }
    }
}

/// The two addresses of a server's first stdout line,
/// `listening ADDR <what> ADDR` (broker: admin; market: direct).
fn listening(child: &mut Child, who: &str) -> (SocketAddr, SocketAddr) {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert!(
        parts.len() == 4 && parts[0] == "listening",
        "{who} did not start: {line:?}"
    );
    (parts[1].parse().unwrap(), parts[3].parse().unwrap())
}

pub struct Output(pub std::process::Output);

impl Output {
    pub fn success(self) -> Self {
        assert!(
            self.0.status.success(),
            "command failed: {}\n{}",
            String::from_utf8_lossy(&self.0.stdout),
            String::from_utf8_lossy(&self.0.stderr)
        );
        self
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
}

/// Polls `f` every 50 ms until it holds; fails the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.0 request: (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path)
}

/// The value on the first line of a node's `/metrics` (at its `admin`
/// address) that starts with `series`, a name or a name with its labels;
/// 0 when there is none yet.
pub fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Logs in and releases `u` on a fresh connection.
pub fn released(b: &Broker, tc: &TerminalConfig, u: &str) -> Terminal {
    let (p1, p2) = pw(u);
    let mut t = b.connect(tc);
    t.login(u, p1.as_bytes()).expect("login");
    t.release(p2.as_bytes()).expect("release");
    t
}

pub fn refused(r: Result<impl std::fmt::Debug, TerminalError>) -> keybroker::proto::ErrorCode {
    match r {
        Err(e) => e.code().unwrap_or_else(|| panic!("untyped error: {e}")),
        Ok(v) => panic!("expected a typed refusal, got {v:?}"),
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An environment with a voucher issuer and, optionally, an SMTP relay.
pub fn wallet_env(relay_port: Option<u16>, broker: &str) -> (Env, PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let issuer = dir.join("issuer");
    let out = std::process::Command::new(BIN)
        .args(["voucher", "keygen", "--out", path_str(&issuer)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let relay = relay_port.map_or(String::new(), |p| format!("127.0.0.1:{p}"));
    let env = Env::with_broker(
        broker,
        &format!(
            "[wallet]\nvoucher_issuer = {:?}\nsmtp_relay = {relay:?}\n",
            issuer.join("issuer.pub")
        ),
    );
    (env, issuer)
}

pub fn voucher(
    env: &Env,
    issuer: &std::path::Path,
    user: &str,
    amount: i64,
    name: &str,
) -> Vec<u8> {
    let out = env.dir.path().join(name);
    env.kb(&[
        "voucher",
        "issue",
        "--issuer-key",
        path_str(&issuer.join("issuer.key")),
        "--user",
        user,
        "--amount",
        &amount.to_string(),
        "--currency",
        "EUR",
        "--out",
        path_str(&out),
    ])
    .success();
    std::fs::read(out).unwrap()
}

/// One SoftHSM token for the whole test binary: `keybroker init` creates
/// it (with the `kb-ledger-mac` key), then this process loads SoftHSM once.
pub fn shared_hsm() -> std::sync::Arc<keybroker::hsm::Hsm> {
    shared_env().1
}

/// The environment of [`shared_hsm`]'s token, and the HSM loaded on it:
/// the one data directory this process may also use the HSM on itself.
pub fn shared_env() -> (&'static Env, std::sync::Arc<keybroker::hsm::Hsm>) {
    use std::sync::{Arc, OnceLock};
    struct Shared {
        env: Env,
        hsm: Arc<keybroker::hsm::Hsm>,
    }
    static SHARED: OnceLock<Shared> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let env = Env::new("");
        let cfg = keybroker::config::Config::load(Some(&env.config), None).expect("config");
        let conf = cfg.path(&cfg.hsm.softhsm2_conf);
        // SoftHSM reads SOFTHSM2_CONF when the module loads, which
        // happens right below, once per test binary.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", conf);
            std::env::remove_var("KEYBROKER_HSM_PIN");
        }
        let hsm = keybroker::hsm::Hsm::open(&cfg).expect("open the HSM");
        Shared {
            env,
            hsm: Arc::new(hsm),
        }
    });
    (&shared.env, shared.hsm.clone())
}
