//! Appliance configuration: one TOML file, validated once at start.
//!
//! Every setting has a default, a bound and a documented cost. Secrets (HSM
//! PIN) are never in this file: it names a file or an environment variable.
//! Relative paths are resolved against `data_dir`.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Environment variable that, when set, holds the HSM user PIN.
pub const PIN_ENV: &str = "KEYBROKER_HSM_PIN";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Runtime state: token directory, database, PKI files. Default `var`.
    pub data_dir: PathBuf,
    pub hsm: HsmConfig,
    pub broker: BrokerConfig,
    pub auth: AuthConfig,
    pub exchange: ExchangeConfig,
    pub admin: AdminConfig,
    pub wallet: WalletConfig,
}

/// What a reload did ([`Config::reloaded`]).
pub struct Reload {
    /// The config to run on now.
    pub config: Config,
    /// The file's config in force: the loaded one, with the live settings
    /// of the reloads since.
    pub file: Config,
    /// Sections whose live settings changed, and are in force now.
    pub applied: Vec<&'static str>,
    /// Sections that still differ from the file: in force at the next restart.
    pub at_restart: Vec<&'static str>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalletConfig {
    /// Where the ledger lives: `sqlite` (default, the file `ledger`) or
    /// `postgres` (the server at `postgres_url`, shared by several nodes).
    pub backend: LedgerBackend,
    /// The ledger database, relative to data_dir. Default `ledger.db`.
    pub ledger: PathBuf,
    /// libpq `key=value` connection string, without a password, e.g.
    /// `host=127.0.0.1 port=5432 user=keybroker dbname=keybroker`.
    pub postgres_url: String,
    /// File whose first line is the PostgreSQL password (relative to
    /// data_dir); empty: none (peer or trust authentication).
    pub password_file: PathBuf,
    /// SMTP relay `host:port` for notifications; empty: a Maildir under
    /// data_dir/mail.
    pub smtp_relay: String,
    /// The notifications' From address.
    pub mail_from: String,
    /// PEM public key of the voucher issuer; empty: top-ups are refused.
    pub voucher_issuer: PathBuf,
    /// Currencies the wallet keeps.
    pub currencies: Vec<String>,
    /// Ledger writes queued before `busy`. Default 8192.
    pub queue: usize,
    /// Most writes committed in one group. Default 512.
    pub group_max: usize,
    /// The append-only file where the writer anchors the ledger's head,
    /// relative to data_dir. Default `ledger.anchors`. Put it where
    /// whoever can write the database cannot truncate it: another disk or
    /// host, or `chattr +a` (docs/OPERATIONS.md, "Ledger anchors").
    pub anchor_file: PathBuf,
    /// Longest time a committed head stays unanchored. Default 1000,
    /// 10..=60000. Cost: two HSM HMACs, one line (~300 bytes) and one
    /// fsync (about 1 ms) per interval while purchases come in, none when
    /// idle.
    pub anchor_interval_ms: u64,
}

impl WalletConfig {
    fn validate(&self) -> Result<()> {
        within("wallet.queue", self.queue as u64, 1..=1_000_000)?;
        within(
            "wallet.group_max",
            self.group_max as u64,
            1..=self.queue.min(65_536) as u64,
        )?;
        within(
            "wallet.anchor_interval_ms",
            self.anchor_interval_ms,
            10..=60_000,
        )?;
        if self.anchor_file.as_os_str().is_empty() || self.ledger.as_os_str().is_empty() {
            bail!("wallet.anchor_file and wallet.ledger must be set");
        }
        if self.backend == LedgerBackend::Postgres && self.postgres_url.is_empty() {
            bail!("wallet.backend = \"postgres\" needs wallet.postgres_url");
        }
        if !self.smtp_relay.is_empty() {
            let port = self
                .smtp_relay
                .rsplit_once(':')
                .map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(p)) if p > 0) {
                bail!(
                    "wallet.smtp_relay must be host:port, got {:?}",
                    self.smtp_relay
                );
            }
        }
        let from = &self.mail_from;
        if from.len() > 254 || from.split('@').count() != 2 || from.chars().any(char::is_whitespace)
        {
            bail!("wallet.mail_from must be one address, local@domain, got {from:?}");
        }
        within(
            "the number of wallet.currencies",
            self.currencies.len() as u64,
            1..=crate::proto::access::MAX_BALANCES as u64,
        )?;
        let mut seen = std::collections::HashSet::new();
        for c in &self.currencies {
            if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) || !seen.insert(c) {
                bail!(
                    "wallet.currencies must be distinct ISO 4217 codes (3 capital letters), got {c:?}"
                );
            }
        }
        Ok(())
    }
}

/// `v` in `range`, or an error naming the setting and its bounds.
fn within(name: &str, v: u64, range: std::ops::RangeInclusive<u64>) -> Result<()> {
    if range.contains(&v) {
        return Ok(());
    }
    bail!(
        "{name} must be {}..={}, got {v}",
        range.start(),
        range.end()
    )
}

impl Default for WalletConfig {
    fn default() -> Self {
        Self {
            backend: LedgerBackend::Sqlite,
            ledger: PathBuf::from("ledger.db"),
            postgres_url: String::new(),
            password_file: PathBuf::new(),
            smtp_relay: String::new(),
            mail_from: "keybroker@localhost".into(),
            voucher_issuer: PathBuf::new(),
            currencies: ["EUR", "USD", "GBP", "JPY", "CHF"]
                .map(String::from)
                .to_vec(),
            queue: 8192,
            group_max: 512,
            anchor_file: PathBuf::from("ledger.anchors"),
            anchor_interval_ms: 1000,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerBackend {
    #[default]
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz`. Default 127.0.0.1:9464 (loopback:
    /// the metrics say who trades where and when).
    pub listen: SocketAddr,
    /// Serves `POST /fault/hsm-sessions`, which closes every HSM session of
    /// the process (what an HSM restart does), for drills and the fault
    /// tests. Off in production.
    pub fault_injection: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".parse().expect("valid default"),
            fault_injection: false,
        }
    }
}

/// Where the ephemeral key and the ECDH secret live.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kx {
    /// In the HSM (`C_GenerateKeyPair` + `C_DeriveKey`): Z never in memory.
    Hsm,
    /// In process with aws-lc-rs: faster; Z lives in memory for microseconds.
    Software,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExchangeConfig {
    /// Key-exchange mode. Default "software".
    pub kx: Kx,
    /// Flush a market batch at this many exchanges. 1..=1024; default 64.
    pub batch_max: usize,
    /// ...or this long after its first exchange, µs. Default 0: a batch is
    /// what queued while the previous one was in flight (docs/DECISIONS.md).
    pub batch_delay_us: u64,
    /// A market silent this long with a batch in flight is down, ms. Default 2000.
    pub market_timeout_ms: u64,
    /// Reconnect backoff to a market, ms: starts at min, doubles to max.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Exchanges queued per core per market before `busy`. Default 4096.
    pub queue: usize,
    /// Exchanges a user may start a second, over all its sessions and the
    /// cores; over it the user gets `busy` with a retry hint and nobody
    /// else waits. Each costs an HSM signature and a session at the market
    /// (which keeps it `session_ttl_s`). 0 = no limit; default 50.
    pub per_user_per_s: u32,
    /// Exchanges a user may save up for a burst. 1..=100000; default 200.
    pub per_user_burst: u32,
    /// An idle market channel is pinged this often, ms; a ping unanswered
    /// within `market_timeout_ms` marks the market down and reconnects.
    /// Keep it below the market's `idle_timeout_ms` (60000 for the
    /// reference market). 100..=600000; default 15000. Cost: one small
    /// frame each way per interval per core per market.
    pub keepalive_ms: u64,
}

impl ExchangeConfig {
    pub fn per_user_rate(&self) -> crate::limits::Rate {
        crate::limits::Rate {
            per_s: self.per_user_per_s,
            burst: self.per_user_burst,
        }
    }
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        Self {
            kx: Kx::Software,
            batch_max: 64,
            batch_delay_us: 0,
            market_timeout_ms: 2_000,
            reconnect_min_ms: 50,
            reconnect_max_ms: 5_000,
            queue: 4096,
            per_user_per_s: 50,
            per_user_burst: 200,
            keepalive_ms: 15_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HsmConfig {
    /// PKCS#11 module. Default: Debian's SoftHSM.
    pub module: PathBuf,
    /// Token label; the slot number is looked up by label at start.
    pub token_label: String,
    /// File holding the user PIN (mode 0600), used when `KEYBROKER_HSM_PIN` is unset.
    pub pin_file: PathBuf,
    /// File holding the security-officer PIN, used only by `init`.
    pub so_pin_file: PathBuf,
    /// SoftHSM config to export as `SOFTHSM2_CONF` unless already set. Empty: none.
    pub softhsm2_conf: PathBuf,
    /// HSM worker threads, each with its own session. 1..=64; default 2.
    pub workers: usize,
    /// Bound of the HSM job queue; a full queue answers `busy`. Default 4096.
    pub queue: usize,
    /// Where core threads run HSM operations: "pool" (worker threads; the
    /// core never waits, right for a network HSM) or "inline" (the core's
    /// own session; no thread hand-off, right for a local CPU-bound token
    /// like SoftHSM). Default "pool".
    pub dispatch: Dispatch,
    /// Seconds a user's unwrapped key stays in the HSM after the user's
    /// last release, so a reconnecting terminal skips the unwrap (0: destroy
    /// with the last session). 0..=3600; default 60.
    pub key_linger_s: u64,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    Pool,
    Inline,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Access-channel listener. Default 127.0.0.1:7443.
    pub listen: SocketAddr,
    /// Core threads, each with its own io_uring and listener. 0 = one per CPU.
    pub cores: usize,
    /// Pin core i to CPU i and steer each connection to the core of the CPU
    /// that took its SYN, when the process may run on exactly CPUs
    /// 0..cores-1 (`net::cores`). Default true.
    pub pin_cores: bool,
    /// Connections held per core before new ones are closed. Default 20000.
    pub max_connections_per_core: usize,
    /// Largest access-channel frame, bytes. 64..=1 MiB; default 16 KiB.
    pub max_frame: usize,
    /// Time allowed for the TLS handshake, ms. Default 5000.
    pub handshake_timeout_ms: u64,
    /// A session silent this long is closed, ms. Default 300000.
    pub idle_timeout_ms: u64,
    /// A frame must arrive whole this long after its first byte, ms. Default 10000.
    pub frame_timeout_ms: u64,
    /// DNS names and IP addresses in the broker's TLS certificate.
    pub server_names: Vec<String>,
    /// Lifetime of the in-memory TLS key's certificate, hours. Default 24.
    pub tls_cert_hours: u64,
    /// Session-ticket key period, hours (keys derive from the HSM's
    /// kb-ticket-key, so every node sharing the HSM accepts the tickets),
    /// and the longest a ticket lives. Default 12.
    pub ticket_hours: u64,
    /// How long a session ticket resumes, seconds: advertised to the
    /// terminal and checked against the issue time sealed in the ticket.
    /// 1..=ticket_hours × 3600; default the whole period.
    pub ticket_lifetime_s: Option<u64>,
    /// Tickets remembered as used, so each resumes once on this node
    /// (broker/tickets.rs). Full, the oldest are refused early. Default 1048576
    /// (about 20 MB).
    pub ticket_replay_entries: usize,
    /// Expect a PROXY protocol v2 header (HAProxy `send-proxy-v2`) first
    /// on every connection. Default false.
    pub proxy_protocol: bool,
    /// Connections one source address (the PROXY header's, behind HAProxy;
    /// IPv6 by /64) may have in their TLS handshake at once, on each core.
    /// Each holds a descriptor and a few KiB until `handshake_timeout_ms`.
    /// 0 = no limit; default 64.
    pub max_pending_per_source: u32,
    /// New connections one source may open a second, on each core: each is
    /// a TLS handshake (a full one costs the broker about 0.3 ms of CPU).
    /// A handshake that times out costs its source 4 more. 0 = no limit;
    /// default 200.
    pub handshakes_per_source_per_s: u32,
    /// ...and may save up for a burst. 1..=100000; default 400.
    pub handshake_burst_per_source: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Failed password attempts before the card locks. 1..=100; default 5.
    pub max_failures: u32,
    /// argon2id memory for new hashes, KiB. Default 19456 (OWASP).
    pub argon2_m_kib: u32,
    /// argon2id passes. Default 2.
    pub argon2_t: u32,
    /// Password-check threads (argon2 is CPU-bound by design). Default 2.
    pub workers: usize,
    /// Bound of the password-check queue, all terminals together. Default 1024.
    pub queue: usize,
    /// Checks one terminal may have queued; the workers take the queued
    /// terminals in turn, so one terminal's checks never wait behind
    /// another's backlog. Over it: `busy`. 1..=queue; default 4.
    pub queue_per_terminal: usize,
    /// Password checks (login and release) one terminal may start a
    /// second; each costs one argon2id, milliseconds of a worker. Over it:
    /// `busy` with a retry hint, before any argon2. 0 = no limit; default 2.
    pub checks_per_terminal_per_s: u32,
    /// ...and may save up for a burst. 1..=100000; default 10.
    pub checks_burst_per_terminal: u32,
    /// Fewest characters a new password may have, at `user add`. 8..=64;
    /// default 8, the floor of NIST SP 800-63B, which prefers length to
    /// composition rules. Read by the CLI, never by a check: raising it
    /// locks nobody out.
    pub min_password_len: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("var"),
            hsm: HsmConfig::default(),
            broker: BrokerConfig::default(),
            auth: AuthConfig::default(),
            exchange: ExchangeConfig::default(),
            admin: AdminConfig::default(),
            wallet: WalletConfig::default(),
        }
    }
}

impl Default for HsmConfig {
    fn default() -> Self {
        Self {
            module: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
            token_label: "keybroker".into(),
            pin_file: PathBuf::from("hsm/user.pin"),
            so_pin_file: PathBuf::from("hsm/so.pin"),
            softhsm2_conf: PathBuf::from("hsm/softhsm2.conf"),
            workers: 2,
            queue: 4096,
            dispatch: Dispatch::Pool,
            key_linger_s: 60,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7443".parse().expect("valid default"),
            cores: 0,
            pin_cores: true,
            max_connections_per_core: 20_000,
            max_frame: crate::proto::access::DEFAULT_MAX_FRAME,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            frame_timeout_ms: 10_000,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            tls_cert_hours: 24,
            ticket_hours: 12,
            ticket_lifetime_s: None,
            ticket_replay_entries: 1 << 20,
            proxy_protocol: false,
            max_pending_per_source: 64,
            handshakes_per_source_per_s: 200,
            handshake_burst_per_source: 400,
        }
    }
}

impl BrokerConfig {
    /// Session-ticket lifetime, seconds.
    pub fn ticket_lifetime(&self) -> u64 {
        self.ticket_lifetime_s.unwrap_or(self.ticket_hours * 3600)
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            max_failures: 5,
            argon2_m_kib: 19_456,
            argon2_t: 2,
            workers: 2,
            queue: 1024,
            queue_per_terminal: 4,
            checks_per_terminal_per_s: 2,
            checks_burst_per_terminal: 10,
            min_password_len: 8,
        }
    }
}

impl Config {
    /// Reads `path` if given, else defaults; `data_dir` overrides the file.
    pub fn load(path: Option<&Path>, data_dir: Option<&Path>) -> Result<Self> {
        let mut cfg: Config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config {}", p.display()))?
            }
            None => Config::default(),
        };
        if let Some(d) = data_dir {
            cfg.data_dir = d.to_path_buf();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The sections of `self` that differ from `other`'s: what a reload
    /// found changed.
    pub fn changed_sections(&self, other: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut diff = |name, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
            if format!("{a:?}") != format!("{b:?}") {
                out.push(name);
            }
        };
        diff("data_dir", &self.data_dir, &other.data_dir);
        diff("hsm", &self.hsm, &other.hsm);
        diff("broker", &self.broker, &other.broker);
        diff("auth", &self.auth, &other.auth);
        diff("exchange", &self.exchange, &other.exchange);
        diff("admin", &self.admin, &other.admin);
        diff("wallet", &self.wallet, &other.wallet);
        out
    }

    /// This config with the live settings of `new`, a file reloaded on
    /// SIGHUP. Live are the ones read per connection, per check or per
    /// exchange, or held where a reload can reset them: the access
    /// channel's timeouts, frame size and per-source limits, the
    /// password-check limits and argon2id cost, and all of `[exchange]`
    /// (each core redials its markets with it). Listeners, cores, the HSM,
    /// the ledger, the admin port, TLS and ticket settings are what the
    /// process was built around: they wait for a restart.
    pub fn with_live(&self, new: &Config) -> Config {
        let mut c = self.clone();
        let (b, nb) = (&mut c.broker, &new.broker);
        b.handshake_timeout_ms = nb.handshake_timeout_ms;
        b.idle_timeout_ms = nb.idle_timeout_ms;
        b.frame_timeout_ms = nb.frame_timeout_ms;
        b.max_frame = nb.max_frame;
        b.max_pending_per_source = nb.max_pending_per_source;
        b.handshakes_per_source_per_s = nb.handshakes_per_source_per_s;
        b.handshake_burst_per_source = nb.handshake_burst_per_source;
        let (a, na) = (&mut c.auth, &new.auth);
        a.max_failures = na.max_failures;
        a.argon2_m_kib = na.argon2_m_kib;
        a.argon2_t = na.argon2_t;
        a.checks_per_terminal_per_s = na.checks_per_terminal_per_s;
        a.checks_burst_per_terminal = na.checks_burst_per_terminal;
        a.min_password_len = na.min_password_len;
        c.exchange = new.exchange.clone();
        c
    }

    /// A reload of `new` into a process running on `running` (the file
    /// as loaded, `self`, adjusted at start, such as caps fitted to the
    /// descriptor limit), reported against the file.
    pub fn reloaded(&self, running: &Config, new: &Config) -> Reload {
        let file = self.with_live(new);
        Reload {
            applied: self.changed_sections(&file),
            at_restart: file.changed_sections(new),
            config: running.with_live(new),
            file,
        }
    }

    /// Every setting against its bounds: the upper ones are what one node
    /// can hold (memory, descriptors, threads) or what stops meaning
    /// anything (a timeout of a day), the lower ones what keeps it working.
    pub fn validate(&self) -> Result<()> {
        const MILLION: u64 = 1_000_000;
        let b = &self.broker;
        within("broker.max_frame", b.max_frame as u64, 64..=1 << 20)?;
        within("broker.cores", b.cores as u64, 0..=1024)?;
        within(
            "broker.max_connections_per_core",
            b.max_connections_per_core as u64,
            1..=MILLION,
        )?;
        within(
            "broker.handshake_timeout_ms",
            b.handshake_timeout_ms,
            1..=600_000,
        )?;
        within("broker.idle_timeout_ms", b.idle_timeout_ms, 1..=86_400_000)?;
        within("broker.frame_timeout_ms", b.frame_timeout_ms, 1..=600_000)?;
        within("broker.ticket_hours", b.ticket_hours, 1..=24 * 7)?;
        if let Some(s) = b.ticket_lifetime_s {
            within("broker.ticket_lifetime_s", s, 1..=b.ticket_hours * 3600)?;
        }
        within(
            "broker.ticket_replay_entries",
            b.ticket_replay_entries as u64,
            1..=1 << 28,
        )?;
        within("broker.tls_cert_hours", b.tls_cert_hours, 1..=24 * 30)?;
        within(
            "broker.max_pending_per_source",
            b.max_pending_per_source.into(),
            0..=MILLION,
        )?;
        within(
            "broker.handshakes_per_source_per_s",
            b.handshakes_per_source_per_s.into(),
            0..=MILLION,
        )?;
        within(
            "broker.handshake_burst_per_source",
            b.handshake_burst_per_source.into(),
            1..=100_000,
        )?;
        let h = &self.hsm;
        within("hsm.workers", h.workers as u64, 1..=64)?;
        within("hsm.queue", h.queue as u64, 1..=MILLION)?;
        within("hsm.key_linger_s", h.key_linger_s, 0..=3600)?;
        let a = &self.auth;
        within("auth.max_failures", a.max_failures.into(), 1..=100)?;
        within("auth.workers", a.workers as u64, 1..=64)?;
        within("auth.queue", a.queue as u64, 1..=MILLION)?;
        within(
            "auth.queue_per_terminal",
            a.queue_per_terminal as u64,
            1..=a.queue as u64,
        )?;
        // Up to 1 GiB a check: each worker holds that much while it hashes.
        within("auth.argon2_m_kib", a.argon2_m_kib.into(), 8..=1 << 20)?;
        within("auth.argon2_t", a.argon2_t.into(), 1..=100)?;
        within(
            "auth.checks_per_terminal_per_s",
            a.checks_per_terminal_per_s.into(),
            0..=100_000,
        )?;
        within(
            "auth.checks_burst_per_terminal",
            a.checks_burst_per_terminal.into(),
            1..=100_000,
        )?;
        // NIST SP 800-63B: no fewer than 8, and 64-character passwords allowed.
        within("auth.min_password_len", a.min_password_len as u64, 8..=64)?;
        let x = &self.exchange;
        within(
            "exchange.batch_max",
            x.batch_max as u64,
            1..=crate::proto::market::MAX_BATCH as u64,
        )?;
        within("exchange.batch_delay_us", x.batch_delay_us, 0..=100_000)?;
        within(
            "exchange.market_timeout_ms",
            x.market_timeout_ms,
            1..=600_000,
        )?;
        within("exchange.reconnect_min_ms", x.reconnect_min_ms, 1..=600_000)?;
        within(
            "exchange.reconnect_max_ms",
            x.reconnect_max_ms,
            x.reconnect_min_ms..=3_600_000,
        )?;
        within("exchange.queue", x.queue as u64, 1..=MILLION)?;
        within(
            "exchange.per_user_per_s",
            x.per_user_per_s.into(),
            0..=MILLION,
        )?;
        within(
            "exchange.per_user_burst",
            x.per_user_burst.into(),
            1..=100_000,
        )?;
        within("exchange.keepalive_ms", x.keepalive_ms, 100..=600_000)?;
        self.wallet.validate()
    }

    /// `p` resolved against the data directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.data_dir.join(p)
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("keybroker.db")
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }

    pub fn cores(&self) -> usize {
        if self.broker.cores == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.broker.cores
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_applies_live_settings_and_names_the_rest_for_a_restart() {
        let file = Config::default();
        // Adjusted at start (a cap fitted to the descriptor limit): not a
        // change in the file.
        let mut running = file.clone();
        running.broker.max_connections_per_core = 100;
        let mut new = file.clone();
        new.auth.max_failures = 9;
        new.exchange.keepalive_ms = 1_000;
        new.broker.idle_timeout_ms = 7;
        new.broker.cores = 3;
        new.hsm.workers = 5;
        let r = file.reloaded(&running, &new);
        assert_eq!(r.applied, ["broker", "auth", "exchange"]);
        assert_eq!(r.at_restart, ["hsm", "broker"]);
        assert_eq!(r.config.auth.max_failures, 9);
        assert_eq!(r.config.exchange.keepalive_ms, 1_000);
        assert_eq!(r.config.broker.idle_timeout_ms, 7);
        assert_eq!(r.config.broker.cores, 0);
        assert_eq!(r.config.broker.max_connections_per_core, 100);
        assert_eq!(r.config.hsm.workers, 2);
        // The same file again: nothing to apply, the same wait.
        let again = r.file.reloaded(&r.config, &new);
        assert!(again.applied.is_empty());
        assert_eq!(again.at_restart, ["hsm", "broker"]);
        // Unchanged: nothing either way.
        let none = file.reloaded(&running, &file);
        assert!(none.applied.is_empty() && none.at_restart.is_empty());
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_bounds_are_refused() {
        assert!(toml::from_str::<Config>("pin = \"1234\"").is_err());
        let mut c = Config::default();
        c.broker.max_frame = 10;
        assert!(c.validate().is_err());
        // A ticket may not outlive its key period (broker/tickets.rs).
        let mut c = Config::default();
        assert_eq!(c.broker.ticket_lifetime(), 12 * 3600);
        c.broker.ticket_lifetime_s = Some(12 * 3600 + 1);
        assert!(c.validate().is_err());
        c.broker.ticket_lifetime_s = Some(2);
        c.validate().unwrap();
        c.broker.ticket_replay_entries = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn every_bound_names_the_setting() {
        let refused = |f: fn(&mut Config), what: &str| {
            let mut c = Config::default();
            f(&mut c);
            let e = c.validate().expect_err(what).to_string();
            assert!(e.contains(what), "{e}");
        };
        refused(
            |c| c.broker.max_connections_per_core = 2_000_000,
            "broker.max_connections_per_core",
        );
        refused(|c| c.broker.cores = 5000, "broker.cores");
        refused(|c| c.auth.argon2_m_kib = 4 << 20, "auth.argon2_m_kib");
        refused(|c| c.hsm.queue = 0, "hsm.queue");
        refused(
            |c| c.exchange.reconnect_max_ms = 1,
            "exchange.reconnect_max_ms",
        );
        refused(|c| c.wallet.queue = 0, "wallet.queue");
        refused(|c| c.wallet.group_max = 100_000, "wallet.group_max");
        refused(
            |c| c.wallet.currencies = vec!["EUR".into(), "EUR".into()],
            "wallet.currencies",
        );
        refused(
            |c| c.wallet.currencies = vec!["eur".into()],
            "wallet.currencies",
        );
        refused(|c| c.wallet.currencies.clear(), "wallet.currencies");
        refused(
            |c| c.wallet.smtp_relay = "relay".into(),
            "wallet.smtp_relay",
        );
        refused(
            |c| c.wallet.mail_from = "two@at@signs".into(),
            "wallet.mail_from",
        );
        refused(
            |c| c.wallet.backend = LedgerBackend::Postgres,
            "wallet.postgres_url",
        );
        let e = {
            let mut c = Config::default();
            c.auth.argon2_t = 0;
            c.validate().unwrap_err().to_string()
        };
        assert_eq!(e, "auth.argon2_t must be 1..=100, got 0");
    }

    #[test]
    fn the_password_floor_is_8_to_64() {
        let floor = |n: usize| {
            let mut c = Config::default();
            c.auth.min_password_len = n;
            c.validate()
        };
        assert_eq!(
            floor(7).unwrap_err().to_string(),
            "auth.min_password_len must be 8..=64, got 7"
        );
        assert!(floor(65).is_err());
        floor(8).unwrap();
        floor(64).unwrap();
        assert_eq!(Config::default().auth.min_password_len, 8);
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../ops/keybroker.example.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
    }
}
