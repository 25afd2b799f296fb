//! The bench's own appliance: a fresh data dir under target/bench/run, the
//! real `keybroker` binary for enrolment, a reference market and brokers.

use crate::procs::{Guard, spawn_listening};
use anyhow::{Context, Result, bail};
use keybroker::terminal::TerminalConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const MARKET_ID: &str = "m1";

pub struct Settings {
    pub users: usize,
    pub terminals_per_user: usize,
    pub argon2_m_kib: u32,
    pub argon2_t: u32,
    /// `hsm.dispatch` of the brokers: "pool" or "inline".
    pub hsm_dispatch: String,
    /// The ledger: None for SQLite (the file in the data dir), else the
    /// libpq connection string of an empty PostgreSQL database (no password).
    pub postgres_url: Option<String>,
}

pub struct Env {
    pub bin: PathBuf,
    pub run: PathBuf,
    /// One enrolled terminal: its directory, user and passwords.
    pub terminals: Vec<TerminalInfo>,
    pub market: Option<Market>,
}

#[derive(Clone)]
pub struct TerminalInfo {
    pub dir: PathBuf,
    pub user: String,
    pub first: String,
    pub second: String,
    pub config: TerminalConfig,
}

pub struct Market {
    pub guard: Guard,
    pub addr: SocketAddr,
}

pub struct Broker {
    pub guard: Guard,
    pub addr: SocketAddr,
    pub kx: String,
}

impl Broker {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

pub fn passwords(u: &str) -> (String, String) {
    (format!("{u}-first-pw"), format!("{u}-second-pw"))
}

impl Env {
    pub fn config(&self, kx: &str) -> PathBuf {
        self.run.join(format!("broker-{kx}.toml"))
    }

    fn kb(&self, args: &[&str], input: &str) -> Result<String> {
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(self.config("software"))
            .args(args)
            .env_remove("SOFTHSM2_CONF")
            .env_remove("KEYBROKER_HSM_PIN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "keybroker {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Moves the last run's `run` aside (see [`remove_old_runs`]) and
    /// recreates it, initialises the data dir, adds users,
    /// enrols terminals, and starts and registers the reference market.
    pub fn create(bin: PathBuf, run: PathBuf, s: &Settings) -> Result<Self> {
        if !bin.exists() {
            bail!(
                "{} not found: run `cargo build --release --workspace` first",
                bin.display()
            );
        }
        if run.exists() {
            let aside = old_run(&run, std::process::id());
            std::fs::rename(&run, &aside)
                .with_context(|| format!("moving {} aside", run.display()))?;
        }
        std::fs::create_dir_all(&run)?;
        let run = run.canonicalize()?;
        let data = run.join("var");
        // A voucher issuer, so the purchase scenario can fund the wallets.
        let issuer = run.join("issuer");
        std::fs::create_dir_all(&issuer)?;
        let (private, public) = keybroker::wallet::voucher::generate_issuer_key()?;
        std::fs::write(issuer.join("issuer.key"), private)?;
        std::fs::write(issuer.join("issuer.pub"), public)?;
        let ledger = match &s.postgres_url {
            None => "backend = \"sqlite\"\n".to_owned(),
            Some(url) => format!("backend = \"postgres\"\npostgres_url = {url:?}\n"),
        };
        // All the load comes from one host and a few terminals and users:
        // the per-source, per-terminal and per-user rates are off
        // (docs/OPERATIONS.md, "Limits under abuse").
        for kx in ["software", "hsm"] {
            std::fs::write(
                run.join(format!("broker-{kx}.toml")),
                format!(
                    "data_dir = {data:?}\n\
                     [admin]\nlisten = \"127.0.0.1:0\"\n\
                     [broker]\nlisten = \"127.0.0.1:0\"\ncores = 2\nmax_connections_per_core = 20000\n\
                     handshake_timeout_ms = 10000\nidle_timeout_ms = 900000\n\
                     max_pending_per_source = 0\nhandshakes_per_source_per_s = 0\n\
                     [auth]\nmax_failures = 100\nargon2_m_kib = {}\nargon2_t = {}\nworkers = 2\nqueue = 1024\n\
                     checks_per_terminal_per_s = 0\n\
                     [hsm]\nworkers = 2\nqueue = 4096\ndispatch = {:?}\n\
                     [exchange]\nkx = \"{kx}\"\nper_user_per_s = 0\n\
                     [wallet]\n{ledger}voucher_issuer = {:?}\n",
                    s.argon2_m_kib,
                    s.argon2_t,
                    s.hsm_dispatch,
                    issuer.join("issuer.pub")
                ),
            )?;
        }
        let mut env = Self {
            bin,
            run: run.clone(),
            terminals: Vec::new(),
            market: None,
        };
        env.kb(&["init"], "")?;
        for u in 0..s.users {
            let user = format!("u{u}");
            let (p1, p2) = passwords(&user);
            env.kb(
                &[
                    "user",
                    "add",
                    &user,
                    "--mail",
                    &format!("{user}@bench.invalid"),
                ],
                &format!("{p1}\n{p2}\n"),
            )?;
        }
        // Enrol terminals one at a time: concurrent SoftHSM processes on
        // one token directory sometimes miss the token.
        let jobs: Vec<(String, PathBuf)> = (0..s.users)
            .flat_map(|u| {
                let run = run.clone();
                (0..s.terminals_per_user).map(move |t| {
                    (
                        format!("u{u}"),
                        run.join("terminals").join(format!("u{u}-t{t}")),
                    )
                })
            })
            .collect();
        for (user, dir) in &jobs {
            env.kb(
                &[
                    "terminal",
                    "enroll",
                    user,
                    "--out",
                    dir.to_str().context("path")?,
                ],
                "",
            )?;
        }
        for (user, dir) in jobs {
            let (first, second) = passwords(&user);
            env.terminals.push(TerminalInfo {
                config: TerminalConfig::load(&dir)?,
                dir,
                user,
                first,
                second,
            });
        }
        env.start_market()?;
        Ok(env)
    }

    fn start_market(&mut self) -> Result<()> {
        let dir = self.run.join("market");
        self.kb(
            &[
                "market",
                "init",
                "--dir",
                dir.to_str().context("path")?,
                "--id",
                MARKET_ID,
                "--listen",
                "127.0.0.1:0",
                "--direct-listen",
                "127.0.0.1:0",
                "--allow",
                "*",
            ],
            "",
        )?;
        // Two users stand for many terminals here, and each exchange leaves
        // a session at the market for `session_ttl_s`: the per-user quota
        // (1000, issue 27) would refuse the load as one user's flood.
        let config = dir.join("market.toml");
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str("max_sessions_per_user = 1000000\n");
        std::fs::write(&config, text)?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["market", "serve", "--market-config"])
            .arg(&config);
        let (guard, addr, _direct) = spawn_listening("market", cmd, &self.run.join("market.log"))?;
        self.kb(
            &[
                "market",
                "add",
                MARKET_ID,
                "--endpoint",
                &addr.to_string(),
                "--ca",
                dir.join("market-ca.crt").to_str().context("path")?,
            ],
            "",
        )?;
        self.market = Some(Market { guard, addr });
        Ok(())
    }

    /// Starts `keybroker serve` with `[exchange] kx = kx`.
    pub fn broker(&self, kx: &str) -> Result<Broker> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(self.config(kx))
            .arg("serve")
            .env_remove("SOFTHSM2_CONF")
            .env_remove("KEYBROKER_HSM_PIN");
        let (guard, addr, _admin) = spawn_listening(
            &format!("broker-{kx}"),
            cmd,
            &self.run.join(format!("broker-{kx}.log")),
        )?;
        Ok(Broker {
            guard,
            addr,
            kx: kx.to_owned(),
        })
    }

    pub fn market_pid(&self) -> Option<u32> {
        self.market.as_ref().map(|m| m.guard.pid())
    }

    /// The SoftHSM config the data dir uses (for the floor child process).
    pub fn softhsm_conf(&self) -> Result<PathBuf> {
        let cfg = keybroker::config::Config::load(Some(&self.config("software")), None)?;
        Ok(cfg.path(&cfg.hsm.softhsm2_conf))
    }
}

/// Where [`Env::create`] moves the last run's directory.
fn old_run(run: &Path, pid: u32) -> PathBuf {
    let mut name = run.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".old-{pid}"));
    run.with_file_name(name)
}

/// Deletes the runs [`Env::create`] moved aside; called once the
/// measurements are done. Deleting a run's 100,000-odd mail files just
/// before measuring made the next run's mail cost about 600 µs a message:
/// ext4 without a journal (as on this machine) skips inodes deleted in the
/// last 5-30 s when it allocates one, and scans the inode table to find
/// them.
pub fn remove_old_runs(run: &Path) {
    let (Some(dir), Some(name)) = (run.parent(), run.file_name()) else {
        return;
    };
    let prefix = format!("{}.old-", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
