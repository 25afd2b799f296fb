//! The `keybroker` command: enrolment, serving, and the terminal CLI.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use keybroker::config::Config;
use keybroker::enroll::{self, Admin};
use keybroker::passwords::{Stdin, read_secret};
use keybroker::terminal::{Direct, Terminal, TerminalConfig};
use keybroker::wallet::Amount;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "keybroker", version, about = "Key-brokering appliance")]
struct Cli {
    /// Config file (TOML). Without it, defaults apply.
    #[arg(long, short, env = "KEYBROKER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory; overrides the config file.
    #[arg(long, env = "KEYBROKER_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    json_logs: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the data directory, the HSM token, the CA keys and certificates.
    Init,
    /// Serve the access channel.
    Serve,
    /// Run the end-to-end demo against an in-process broker (after demo-enroll).
    Demo,
    /// Enrol demo users and terminals under <data dir>/demo (idempotent).
    DemoEnroll,
    /// Whether the running appliance is healthy: HSM, market links,
    /// sessions, mail queue (read-only, from the admin port). Exits 1 if not.
    Status {
        /// The admin address, when the config's is port 0 or another node's.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Users: add, list, remove, unlock.
    #[command(subcommand)]
    User(UserCmd),
    /// Terminals: enrol and revoke them, and act as one (login, exchange,
    /// purchase, cancel, top-up).
    #[command(subcommand)]
    Terminal(TerminalCmd),
    /// Markets: register them, and run the reference market.
    #[command(subcommand)]
    Market(MarketCmd),
    /// The wallet ledger: balances, history, audit.
    #[command(subcommand)]
    Wallet(WalletCmd),
    /// Top-up vouchers: the issuer's key, and vouchers signed with it.
    #[command(subcommand)]
    Voucher(VoucherCmd),
    /// Check every registry row against its HSM MAC; exits 1 if any fails.
    Check,
    /// A consistent online copy of the registry and the SQLite ledger,
    /// and the config file, into a new directory with a manifest of
    /// SHA-256s; safe while the broker serves. The HSM token and the PINs
    /// are backed up apart (docs/OPERATIONS.md, "Backup and restore").
    Backup {
        /// A directory that does not exist yet, or is empty.
        dir: std::path::PathBuf,
    },
    /// With the broker stopped: put the databases of the backup in DIR
    /// back (checked against its manifest first), or take the files put
    /// back by hand; then verify the ledger's chain, record the restore
    /// in the anchor file so the audit accepts its older head, and check
    /// the registry rows.
    Restore {
        /// A directory `keybroker backup` wrote; omit it if the files were
        /// put back by hand.
        dir: Option<std::path::PathBuf>,
        /// Why, for the record (1-200 printable ASCII characters).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum WalletCmd {
    /// A user's balances.
    Balance {
        /// The user id.
        user: String,
    },
    /// A user's ledger entries, oldest first.
    History {
        /// The user id.
        user: String,
    },
    /// Re-verify the HMAC chain and every balance, and check the ledger
    /// against its anchors; exits 1 on any mismatch.
    Audit {
        /// A log holding anchor lines too (`journalctl -o cat -u keybroker
        /// > FILE`), checked besides wallet.anchor_file. Repeatable.
        #[arg(long)]
        anchor_log: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum VoucherCmd {
    /// Create an issuer key pair: DIR/issuer.key (keep it offline) and
    /// DIR/issuer.pub (set wallet.voucher_issuer to it).
    Keygen {
        /// Directory to write issuer.key and issuer.pub into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a single-use top-up voucher for a user.
    Issue {
        /// The issuer's private key (issuer.key from `voucher keygen`).
        #[arg(long)]
        issuer_key: PathBuf,
        /// The user the voucher tops up; no one else can redeem it.
        #[arg(long)]
        user: String,
        /// Minor units (cents).
        #[arg(long)]
        amount: i64,
        /// ISO 4217 code, one the wallet keeps (wallet.currencies).
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// Days until it expires.
        #[arg(long, default_value_t = 30)]
        days: i64,
        /// File to write the voucher to.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user: home-card key in the HSM, certificate, both passwords.
    /// Passwords come from files, or as two lines on stdin (first, second).
    Add {
        /// The user id: 1-64 characters of A-Z a-z 0-9 . _ -
        id: String,
        /// Where purchase, cancel and top-up notices go.
        #[arg(long)]
        mail: String,
        /// File holding the first password (login); "-": a line of stdin,
        /// asked for without echo on a terminal.
        #[arg(long, default_value = "-")]
        access_password_file: String,
        /// File holding the second password (release); "-": as above.
        #[arg(long, default_value = "-")]
        release_password_file: String,
    },
    /// Every user, with its state and failed-password count.
    List,
    /// Remove a user and its home-card key; its terminals stop working.
    Remove {
        /// The user id.
        id: String,
    },
    /// Clear a lockout after too many wrong passwords.
    Unlock {
        /// The user id.
        id: String,
    },
    /// Change a password. The first needs no old one (an operator's reset);
    /// the second needs the current one, since only it opens the home card,
    /// whose key is then wrapped again inside the HSM. The new password
    /// meets auth.min_password_len. Sessions released before keep working.
    Passwd {
        /// The user id.
        id: String,
        /// Change the second (release) password instead of the first.
        #[arg(long)]
        second: bool,
        /// File holding the current second password (with --second); "-":
        /// a line of stdin, asked for without echo on a terminal.
        #[arg(long, default_value = "-")]
        current_password_file: String,
        /// File holding the new password; "-": a line of stdin (after the
        /// current one, with --second).
        #[arg(long, default_value = "-")]
        new_password_file: String,
    },
}

#[derive(Subcommand)]
enum TerminalCmd {
    /// Issue a terminal key and certificate for a user into DIR.
    Enroll {
        /// The user the terminal logs in for (and no other).
        user: String,
        /// Directory to write terminal.key, terminal.crt and broker-ca.crt into.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime, seconds (default one year).
        #[arg(long, default_value_t = enroll::TERMINAL_LIFETIME.as_secs())]
        valid_s: u64,
    },
    /// Every terminal: serial, user, state, certificate fingerprint.
    List {
        /// Only this user's terminals.
        #[arg(long)]
        user: Option<String>,
    },
    /// Refuse a terminal's certificate from now on.
    Revoke {
        /// The serial `terminal enroll` printed (first column of `terminal list`).
        serial: String,
    },
    /// Log in, release, have the broker agree a key with a market, and send
    /// one encrypted request on the direct channel.
    Exchange {
        #[command(flatten)]
        session: SessionArgs,
        /// The market's id, as registered with `market add`.
        #[arg(long)]
        market: String,
        /// Partial proxy: the terminal does the ECDH; the broker only signs.
        #[arg(long)]
        partial: bool,
        /// What to send the market on the direct channel.
        #[arg(long, default_value = "hello market")]
        request: String,
    },
    /// Connect, log in and release, as a terminal would.
    Login {
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Buy: debit the wallet, then present the signed receipt to the market.
    Purchase {
        #[command(flatten)]
        session: SessionArgs,
        /// The market's id, as registered with `market add`.
        #[arg(long)]
        market: String,
        /// Minor units (cents).
        #[arg(long)]
        amount: i64,
        /// ISO 4217 code, one the wallet keeps.
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// The market's reference for what is bought (in the receipt).
        #[arg(long)]
        order_ref: String,
        /// Retrying with the same key never debits twice.
        #[arg(long)]
        idempotency_key: String,
    },
    /// Cancel a decision: get the market's authorisation on the direct
    /// channel, then have the broker refund it.
    Cancel {
        #[command(flatten)]
        session: SessionArgs,
        /// The market the purchase was made at.
        #[arg(long)]
        market: String,
        /// The decision id `terminal purchase` printed.
        #[arg(long)]
        decision: String,
    },
    /// Top up with a voucher file (the second password is asked again).
    Topup {
        #[command(flatten)]
        session: SessionArgs,
        /// The voucher file `voucher issue` wrote.
        #[arg(long)]
        voucher: PathBuf,
    },
}

/// How a terminal CLI command reaches the broker and logs in.
#[derive(clap::Args)]
struct SessionArgs {
    /// Directory written by `terminal enroll`.
    #[arg(long)]
    dir: PathBuf,
    /// The user to log in as; the terminal must be enrolled for it.
    #[arg(long)]
    user: String,
    /// The broker's access channel.
    #[arg(long, default_value = "127.0.0.1:7443")]
    broker: SocketAddr,
    /// File holding the first password; "-": a line of stdin, asked for
    /// without echo on a terminal.
    #[arg(long, default_value = "-")]
    access_password_file: String,
    /// File holding the second password; "-": as above.
    #[arg(long, default_value = "-")]
    release_password_file: String,
}

impl SessionArgs {
    /// Connects, logs in and releases; returns the session and the second
    /// password (top-ups need it again).
    fn open(&self, stdin: &mut Stdin<'_>) -> Result<(Terminal, zeroize::Zeroizing<String>)> {
        // The terminal's files first: a wrong --dir is told before anyone
        // types a password for nothing.
        let tc = TerminalConfig::load(&self.dir)?;
        let p1 = read_secret(&self.access_password_file, "first password", stdin)?;
        let p2 = read_secret(&self.release_password_file, "second password", stdin)?;
        // Login and Release leave in one flight; the broker's key
        // confirmation is checked before this returns.
        let t = Terminal::connect_and_release(
            self.broker,
            &tc,
            Duration::from_secs(10),
            &self.user,
            p1.as_bytes(),
            p2.as_bytes(),
        )
        .context("connect, login and release")?;
        println!("logged in as {}; X' confirmed by the broker", self.user);
        println!(
            "released: the broker may act for {} in this session",
            self.user
        );
        Ok((t, p2))
    }
}

/// The session user's balances as a user reads them, "12.50 EUR, 300 JPY".
fn balances(t: &mut Terminal) -> Result<String> {
    let all = t.balance().context("balance")?;
    let shown: Vec<String> = all
        .iter()
        .map(|(c, minor)| Amount::new(*minor, c).map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    Ok(shown.join(", "))
}

fn direct_to(t: &mut Terminal, market: &str) -> Result<Direct> {
    let b = t.exchange(market).context("exchange")?;
    Direct::connect(&b, Duration::from_secs(10)).context("direct channel")
}

#[derive(Subcommand)]
enum MarketCmd {
    /// Create a reference market's keys, certificates and config in DIR.
    Init {
        /// Directory for the market's keys, certificates and market.toml.
        #[arg(long)]
        dir: PathBuf,
        /// The market's id (its certificate's name, and `market add`'s).
        #[arg(long)]
        id: String,
        /// Address of the market channel, where the broker connects.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Address of the direct channel, where terminals connect.
        #[arg(long, default_value = "127.0.0.1:8444")]
        direct_listen: String,
        /// Users allowed to trade there (comma-separated); default all.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        allow: Vec<String>,
    },
    /// Run the reference market from its config file.
    Serve {
        /// The market.toml `market init` wrote.
        #[arg(long)]
        market_config: PathBuf,
    },
    /// Register a market and the CA that certifies it.
    Add {
        /// The market's id, as its certificate names it.
        id: String,
        /// HOST:PORT of its market channel.
        #[arg(long)]
        endpoint: String,
        /// PEM file of the CA that certifies the market (market-ca.crt
        /// from `market init`).
        #[arg(long)]
        ca: PathBuf,
    },
    /// Every registered market and its endpoint.
    List,
    /// Unregister a market.
    Remove {
        /// The market's id.
        id: String,
    },
}

/// Logs go to stderr through the batching `log-writer` thread
/// (keybroker::logs): a core thread formats a line and queues it, and never
/// blocks in write(2) on the log file (one synchronous write per audit line
/// took about a quarter of the core threads' CPU under load).
fn init_logs(json: bool) -> std::sync::Arc<keybroker::logs::Logs> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, logs) = keybroker::logs::start(std::io::stderr()).unwrap_or_else(|e| {
        eprintln!("error: starting the log writer: {e}");
        std::process::exit(1);
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if json {
        b.json().init();
    } else {
        b.init();
    }
    std::sync::Arc::new(logs)
}

/// SIGTERM (a service stop) and SIGINT write out the queued log lines, then
/// end the process by the signal's default action, as before: an exit
/// status of "killed by SIGTERM", which systemd counts as a clean stop.
/// Not `std::process::exit`: its atexit handlers (OpenSSL's cleanup, under
/// SoftHSM) would run while core threads may still be inside the HSM.
/// Nothing else needs a graceful stop: an operation is acknowledged only
/// once the ledger has committed it.
fn stop_on_signals(logs: std::sync::Arc<keybroker::logs::Logs>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                keybroker::service::stopping();
                tracing::info!(signal = sig, "stopping");
                logs.flush();
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                signal_hook::low_level::exit(128 + sig);
            }
        })?;
    Ok(())
}

/// SIGHUP (`systemctl reload`): the registry's markets are re-read at
/// once (users and terminals are read at every login), and the config
/// file is loaded again. A file that no longer loads is refused, with the
/// reason in the log, and the running config stays. One that loads has its
/// live settings applied ([`Config::reloaded`]); the log names the sections
/// applied and those that take effect at the next restart.
fn reload_on_sighup(
    reloader: keybroker::broker::Reloader,
    config: Option<std::path::PathBuf>,
    data_dir: Option<std::path::PathBuf>,
) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                keybroker::service::reloading();
                reloader.registries();
                match Config::load(config.as_deref(), data_dir.as_deref()) {
                    Ok(new) => {
                        let r = reloader.config(&new);
                        if r.applied.is_empty() && r.at_restart.is_empty() {
                            tracing::info!("SIGHUP: registries re-read; the config file is unchanged");
                        }
                        if !r.applied.is_empty() {
                            tracing::info!(
                                sections = %r.applied.join(","),
                                "SIGHUP: registries re-read; the live settings of these sections are in force"
                            );
                        }
                        if !r.at_restart.is_empty() {
                            tracing::warn!(
                                sections = %r.at_restart.join(","),
                                "SIGHUP: the config file changed in these sections, which take effect at the next restart"
                            );
                        }
                    }
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "SIGHUP: the config file is refused; the running config stays"
                    ),
                }
                keybroker::service::ready("reloaded");
            }
        })?;
    Ok(())
}

fn main() {
    // Owner-only, whatever the caller's umask: the data directory holds
    // password hashes, balances, PINs and the token (keybroker::fsmode).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(keybroker::fsmode::UMASK));
    let cli = Cli::parse();
    let json = cli.json_logs;
    let logs = init_logs(json);
    if json {
        // A panic is a log line like any other, so the journal's JSON
        // readers see why the process ended.
        let logs = logs.clone();
        std::panic::set_hook(Box::new(move |info| {
            tracing::error!(panic = %info, "fatal: panic");
            logs.flush();
        }));
    }
    let fatal = |what: &str, e: anyhow::Error| {
        if json {
            tracing::error!(error = %format!("{e:#}"), "fatal: {what}");
            logs.flush();
        } else {
            logs.flush();
            eprintln!("error: {what}{e:#}");
        }
        std::process::exit(1);
    };
    if let Err(e) = stop_on_signals(logs.clone()) {
        fatal("installing the signal handlers: ", e);
    }
    // The signal thread holds the other reference: flush, not drop.
    match run(cli) {
        Ok(()) => logs.flush(),
        Err(e) => fatal("", e),
    }
}

fn run(cli: Cli) -> Result<()> {
    let cfg = Config::load(cli.config.as_deref(), cli.data_dir.as_deref())?;
    keybroker::hsm::export_softhsm_conf(&cfg);
    // Every command that opens the data directory checks its modes first;
    // init makes it (owner-only), and status (the admin port), the
    // terminal's and voucher commands and the reference market do not use it.
    let uses_data_dir = match &cli.cmd {
        Cmd::Init | Cmd::Voucher(_) | Cmd::Status { .. } => false,
        Cmd::Market(c) => !matches!(c, MarketCmd::Init { .. } | MarketCmd::Serve { .. }),
        Cmd::Terminal(c) => matches!(
            c,
            TerminalCmd::Enroll { .. } | TerminalCmd::List { .. } | TerminalCmd::Revoke { .. }
        ),
        _ => true,
    };
    if uses_data_dir {
        keybroker::fsmode::check(&cfg)?;
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let mut lines = std::io::stdin().lock();
    let mut stdin = Stdin::new(&mut lines, tty);
    match cli.cmd {
        Cmd::Init => {
            enroll::init(&cfg)?;
            println!("initialised {}", cfg.data_dir.display());
        }
        Cmd::Serve => {
            let _serving = keybroker::backup::DirLock::serving(&cfg)?;
            let broker = keybroker::broker::Broker::start(cfg.clone())?;
            reload_on_sighup(broker.reloader(), cli.config.clone(), cli.data_dir.clone())?;
            // One machine-readable line, so scripts and tests learn the port.
            println!("listening {} admin {}", broker.addr, broker.admin_addr);
            use std::io::Write;
            std::io::stdout().flush()?;
            keybroker::service::spawn_watchdog(broker.heartbeats())?;
            keybroker::service::ready(&format!(
                "listening {} admin {}",
                broker.addr, broker.admin_addr
            ));
            broker.join();
        }
        Cmd::DemoEnroll => demo_enroll(&cfg)?,
        Cmd::Status { admin } => {
            if !keybroker::status::run(&cfg, admin.unwrap_or(cfg.admin.listen))? {
                std::process::exit(1);
            }
        }
        Cmd::Demo => keybroker::demo::run(cfg)?,
        Cmd::User(c) => user(&cfg, c, &mut stdin)?,
        Cmd::Terminal(c) => terminal(&cfg, c, &mut stdin)?,
        Cmd::Market(c) => market(&cfg, c)?,
        Cmd::Wallet(c) => wallet(&cfg, c)?,
        Cmd::Voucher(c) => voucher(c)?,
        Cmd::Check => check(cfg)?,
        Cmd::Backup { dir } => backup(&cfg, cli.config.as_deref(), &dir)?,
        Cmd::Restore { dir, reason } => restore(cfg, dir.as_deref(), &reason)?,
    }
    Ok(())
}

/// `keybroker check`: every bad row, one a line, then a summary.
fn check(cfg: Config) -> Result<()> {
    let admin = Admin::open(&cfg)?;
    let report = admin.store.check()?;
    for b in &report.bad {
        println!("bad {}/{}: {}", b.table, b.key, b.why);
    }
    for u in admin.store.user_list()?.into_iter().flatten() {
        if let Some(keybroker::passwords::Stored::Hash(_)) =
            keybroker::passwords::stored(&u.pw_release)
        {
            println!(
                "note users/{}: key not yet bound to the second password (it is at the next release)",
                u.id
            );
        }
    }
    if report.bad.is_empty() {
        println!("check ok: {} rows", report.rows);
        return Ok(());
    }
    println!("check failed: {} of {} rows", report.bad.len(), report.rows);
    bail!(
        "the registry failed its check: restore those rows from a backup, or remove and add them again (docs/SECURITY.md)"
    )
}

fn user(cfg: &Config, c: UserCmd, stdin: &mut Stdin<'_>) -> Result<()> {
    let admin = Admin::open(cfg)?;
    match c {
        UserCmd::Add {
            id,
            mail,
            access_password_file,
            release_password_file,
        } => {
            let p1 = read_secret(&access_password_file, "first password", stdin)?;
            let p2 = read_secret(&release_password_file, "second password", stdin)?;
            enroll::user_add(&admin, &id, &mail, &p1, &p2)?;
            println!("added user {id}");
        }
        UserCmd::Passwd {
            id,
            second,
            current_password_file,
            new_password_file,
        } => {
            let (which, current) = if second {
                let c = read_secret(&current_password_file, "current second password", stdin)?;
                (enroll::WhichPassword::Release, Some(c))
            } else {
                (enroll::WhichPassword::Access, None)
            };
            let new = read_secret(&new_password_file, "new password", stdin)?;
            enroll::user_passwd(
                &admin,
                &id,
                which,
                current.as_deref().map(|s| s.as_str()),
                &new,
            )?;
            let which = if second { "second" } else { "first" };
            println!("changed {id}'s {which} password");
        }
        UserCmd::List => {
            for u in admin.store.user_list()? {
                match u {
                    Ok(u) => {
                        let state = if u.locked { "locked" } else { "active" };
                        println!("{}\t{}\t{state}\tfailures={}", u.id, u.mail, u.failures);
                    }
                    Err(bad) => println!("{}\t-\trefused: {}\t-", bad.key, bad.why),
                }
            }
        }
        UserCmd::Remove { id } => {
            if !admin.store.user_remove(&id)? {
                bail!("no user {id}");
            }
            println!("removed user {id}");
        }
        UserCmd::Unlock { id } => {
            if !admin.store.unlock(&id)? {
                bail!("no user {id}");
            }
            println!("unlocked user {id}");
        }
    }
    Ok(())
}

fn terminal(cfg: &Config, c: TerminalCmd, stdin: &mut Stdin<'_>) -> Result<()> {
    match c {
        TerminalCmd::Enroll { user, out, valid_s } => {
            let lifetime = Duration::from_secs(valid_s.max(1));
            let serial = enroll::terminal_enroll_for(&Admin::open(cfg)?, &user, &out, lifetime)?;
            println!(
                "enrolled terminal {serial} for {user} into {}",
                out.display()
            );
        }
        TerminalCmd::List { user } => {
            for t in Admin::open(cfg)?.store.terminal_list(user.as_deref())? {
                match t {
                    Ok(t) => {
                        let state = if t.revoked { "revoked" } else { "active" };
                        let fp = hex::encode(&t.fingerprint);
                        println!("{}\t{}\t{state}\t{fp}", t.serial, t.user_id);
                    }
                    Err(bad) => println!("-\t-\trefused: {}\t{}", bad.why, bad.key),
                }
            }
        }
        TerminalCmd::Revoke { serial } => {
            if !Admin::open(cfg)?.store.terminal_revoke(&serial)? {
                bail!("no terminal {serial}");
            }
            println!("revoked terminal {serial}");
        }
        TerminalCmd::Login { session } => {
            let (t, _) = session.open(stdin)?;
            // The key confirmation both ends computed (LoginOk), not a key.
            println!(
                "X' confirmation (checked): {}",
                hex::encode(&t.keys().confirm()[..8])
            );
            t.logout()?;
        }
        TerminalCmd::Exchange {
            session,
            market,
            partial,
            request,
        } => {
            let (mut t, _) = session.open(stdin)?;
            let b = if partial {
                t.exchange_partial(&market)
            } else {
                t.exchange(&market)
            }
            .context("exchange")?;
            println!(
                "session {} with {market} at {}",
                hex::encode(b.session_id),
                b.endpoint
            );
            let (_, answer) = Direct::open(&b, Duration::from_secs(10), request.as_bytes())
                .context("direct request")?;
            println!("market answered: {}", String::from_utf8_lossy(&answer));
            t.logout()?;
        }
        TerminalCmd::Purchase {
            session,
            market,
            amount,
            currency,
            order_ref,
            idempotency_key,
        } => {
            let (mut t, _) = session.open(stdin)?;
            let (balance, receipt) = t
                .purchase(&market, amount, &currency, &order_ref, &idempotency_key)
                .context("purchase")?;
            let decision = direct_to(&mut t, &market)?
                .present_receipt(&receipt)
                .context("receipt")?;
            println!(
                "decision {decision}: the market accepted the receipt; balance {}",
                Amount::new(balance, &currency)?
            );
            t.logout()?;
        }
        TerminalCmd::Cancel {
            session,
            market,
            decision,
        } => {
            let (mut t, _) = session.open(stdin)?;
            let auth = direct_to(&mut t, &market)?
                .cancel_authorisation(&decision)
                .context("authorisation")?;
            t.cancel(&decision, auth).context("cancel")?;
            // The answer's balance is in minor units of the decision's
            // currency, which the terminal does not hold: ask for the
            // balances, with their currencies.
            println!("cancelled {decision}; balance {}", balances(&mut t)?);
            t.logout()?;
        }
        TerminalCmd::Topup { session, voucher } => {
            let (mut t, p2) = session.open(stdin)?;
            let bytes = std::fs::read(&voucher)
                .with_context(|| format!("reading {}", voucher.display()))?;
            let v = keybroker::wallet::voucher::Signed::decode(&bytes)
                .with_context(|| format!("{} is not a voucher", voucher.display()))?;
            let balance = t.top_up(&bytes, p2.as_bytes()).context("top-up")?;
            println!(
                "topped up {}; balance {}",
                v.voucher.amount,
                Amount {
                    minor: balance,
                    ..v.voucher.amount
                }
            );
            t.logout()?;
        }
    }
    Ok(())
}

fn wallet(cfg: &Config, c: WalletCmd) -> Result<()> {
    let hsm = std::sync::Arc::new(keybroker::hsm::Hsm::open(cfg)?);
    // The configured back end (`wallet.backend`); no mailer here. It reads
    // the anchors and appends none: the running broker owns the file.
    let mut anchor = keybroker::broker::anchor_config(cfg);
    anchor.write = false;
    if let WalletCmd::Audit { anchor_log } = &c {
        anchor.logs.clone_from(anchor_log);
    }
    let (ledger, _) = keybroker::broker::open_ledger(cfg, hsm.clone(), anchor)?;
    if let WalletCmd::Balance { user } | WalletCmd::History { user } = &c {
        known_to_wallet(&Admin::on(cfg, hsm)?, &*ledger, user)?;
    }
    match c {
        WalletCmd::Balance { user } => {
            for a in ledger.balance(&user)? {
                println!("{a}");
            }
        }
        WalletCmd::History { user } => {
            for e in ledger.history(&user)? {
                println!(
                    "{}\t{}\t{}\t{}\tbalance={}\t{}\t{}",
                    e.seq,
                    e.kind.as_str(),
                    e.amount,
                    e.decision_id,
                    Amount {
                        minor: e.balance_after,
                        ..e.amount
                    },
                    e.market,
                    e.order_ref
                );
            }
        }
        WalletCmd::Audit { .. } => print_audit(&ledger.audit()?)?,
    }
    Ok(())
}

/// A user the registry has, or one removed whose entries the ledger
/// still holds (their money did not go with them); anyone else is a typo,
/// and printing a zero balance for it would hide that.
fn known_to_wallet(
    admin: &Admin,
    ledger: &dyn keybroker::wallet::Ledger,
    user: &str,
) -> Result<()> {
    if admin.store.user_get(user)?.is_some() {
        return Ok(());
    }
    if ledger.history(user)?.is_empty() {
        bail!("no user {user} (see `keybroker user list`)");
    }
    eprintln!(
        "note: user {user} is not in the registry (removed); the ledger still holds their entries"
    );
    Ok(())
}

/// Prints an audit's findings and its verdict; an error if it failed.
fn print_audit(report: &keybroker::wallet::AuditReport) -> Result<()> {
    for n in &report.notes {
        println!("note: {n}");
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    println!(
        "audit {}: {} entries, {} anchors",
        if report.ok { "ok" } else { "FAILED" },
        report.entries,
        report.anchors
    );
    if !report.ok {
        bail!("the ledger failed its audit");
    }
    Ok(())
}

/// `keybroker backup DIR` (src/backup.rs).
fn backup(
    cfg: &Config,
    config_file: Option<&std::path::Path>,
    dir: &std::path::Path,
) -> Result<()> {
    let m = keybroker::backup::backup(cfg, config_file, dir)?;
    for f in &m.files {
        println!("{} {} ({}, {} bytes)", f.sha256, f.name, f.role, f.bytes);
    }
    if let Some(why) = &m.ledger_elsewhere {
        println!("not copied: {why}");
    }
    println!("backup written to {}", dir.display());
    Ok(())
}

/// `keybroker restore [DIR] --reason`: the files put back, then the
/// restore record (src/wallet/anchor.rs) and the registry check.
fn restore(cfg: Config, from: Option<&std::path::Path>, reason: &str) -> Result<()> {
    let lock = keybroker::backup::DirLock::restoring(&cfg)?;
    if let Some(dir) = from {
        for p in keybroker::backup::restore(&cfg, dir, &lock)? {
            println!("put back {}", p.display());
        }
    }
    record_restore(&cfg, reason)?;
    check(cfg)
}

/// The restore record (src/wallet/anchor.rs).
fn record_restore(cfg: &Config, reason: &str) -> Result<()> {
    let hsm = std::sync::Arc::new(keybroker::hsm::Hsm::open(cfg)?);
    let (ledger, _) =
        keybroker::broker::open_ledger(cfg, hsm, keybroker::broker::anchor_config(cfg))?;
    let r = ledger.restore(reason)?;
    if r.record.is_none() {
        print_audit(&r.audit)?;
    }
    let head = |a: &keybroker::wallet::anchor::Anchor| {
        let h = a.head(0).map_or(0, |h| h.seq);
        format!(
            "entry {h} (anchored {})",
            keybroker::wallet::anchor::utc(a.t_ms)
        )
    };
    if let Some(s) = &r.superseded {
        println!("supersedes the newest anchor: {}", head(s));
    }
    if let Some(a) = &r.record {
        println!(
            "restore recorded: the ledger's head is {} after {} entries",
            head(a),
            r.audit.entries
        );
    }
    Ok(())
}

fn voucher(c: VoucherCmd) -> Result<()> {
    use keybroker::wallet::{now_ms, voucher};
    match c {
        VoucherCmd::Keygen { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (private, public) = voucher::generate_issuer_key()?;
            enroll::write_private(&out.join("issuer.key"), private.as_bytes())?;
            let pub_path = out.join("issuer.pub");
            std::fs::write(&pub_path, public)
                .with_context(|| format!("writing {}", pub_path.display()))?;
            println!("issuer key in {}", out.display());
        }
        VoucherCmd::Issue {
            issuer_key,
            user,
            amount,
            currency,
            days,
            out,
        } => {
            let pem = zeroize::Zeroizing::new(
                std::fs::read_to_string(&issuer_key)
                    .with_context(|| format!("reading the issuer key {}", issuer_key.display()))?,
            );
            let der = zeroize::Zeroizing::new(voucher::pem_der(&pem, "PRIVATE KEY")?);
            let expiry = now_ms() + days * 86_400_000;
            let (v, bytes) = voucher::issue(&der, &user, Amount::new(amount, &currency)?, expiry)?;
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "voucher {} for {user}: {} in {}",
                hex::encode(v.id),
                v.amount,
                out.display()
            );
        }
    }
    Ok(())
}

fn market(cfg: &Config, c: MarketCmd) -> Result<()> {
    match c {
        MarketCmd::Init {
            dir,
            id,
            listen,
            direct_listen,
            allow,
        } => {
            let path = keybroker::market::setup::init(&keybroker::market::setup::InitArgs {
                dir: &dir,
                id: &id,
                broker_pki: &cfg.pki_dir(),
                listen: &listen,
                direct_listen: &direct_listen,
                allowed_users: &allow,
            })?;
            println!("market {id} configured in {}", path.display());
            return Ok(());
        }
        MarketCmd::Serve { market_config } => {
            let m = keybroker::market::server::start(&market_config)?;
            println!("listening {} direct {}", m.addr, m.direct_addr);
            use std::io::Write;
            std::io::stdout().flush()?;
            m.join();
            return Ok(());
        }
        _ => {}
    }
    let admin = Admin::open(cfg)?;
    match c {
        MarketCmd::Init { .. } | MarketCmd::Serve { .. } => unreachable!("handled above"),
        MarketCmd::Add { id, endpoint, ca } => {
            enroll::market_add(&admin.store, &id, &endpoint, &ca)?;
            println!("added market {id} at {endpoint}");
        }
        MarketCmd::List => {
            for m in admin.store.market_list()? {
                match m {
                    Ok(m) => println!("{}\t{}", m.id, m.endpoint),
                    Err(bad) => println!("{}\trefused: {}", bad.key, bad.why),
                }
            }
        }
        MarketCmd::Remove { id } => {
            if !admin.store.market_remove(&id)? {
                bail!("no market {id}");
            }
            println!("removed market {id}");
        }
    }
    Ok(())
}

/// Demo users with their passwords in files under <data dir>/demo/<user>/,
/// next to the terminal's PEM files. For demonstrations only.
fn demo_enroll(cfg: &Config) -> Result<()> {
    let admin = Admin::open(cfg)?;
    for user in keybroker::demo::DEMO_USERS {
        let (p1, p2) = (format!("{user}-access-pw"), format!("{user}-release-pw"));
        let dir = cfg.data_dir.join("demo").join(user);
        if admin.store.user_get(user)?.is_none() {
            enroll::user_add(&admin, user, &format!("{user}@example.org"), &p1, &p2)?;
        }
        if !dir.join("terminal.crt").exists() {
            enroll::terminal_enroll(&admin, user, &dir)?;
            enroll::write_private(&dir.join("access.pw"), p1.as_bytes())?;
            enroll::write_private(&dir.join("release.pw"), p2.as_bytes())?;
        }
        println!("demo user {user}: terminal files in {}", dir.display());
    }
    let market = keybroker::demo::prepare_run(cfg, &admin.store)?;
    println!(
        "reference market {}: {} (registered)",
        keybroker::demo::RUN_MARKET,
        market.display()
    );
    println!("\n{}", keybroker::demo::try_it(&cfg.data_dir));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every argument an operator can type has help
    /// text: `--help` is the manual at hand on an appliance.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in c.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cli, "keybroker", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
