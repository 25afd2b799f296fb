//! The broker: one thread per core, each with its own io_uring runtime and
//! SO_REUSEPORT listener; blocking work in bounded pools.
//!
//! ```text
//!            ┌─ core 0: compio runtime ─ listener ─ connections ─┐
//! terminals ─┤                                                   ├─► auth pool (argon2id, registry)
//!            └─ core N: compio runtime ─ listener ─ connections ─┘─► HSM pool (one session per worker)
//! ```

pub mod auth;
mod card;
mod conn;
mod exchange;
pub mod link;
mod markets;
mod released;
mod revoke;
pub(crate) mod tickets;
pub mod tls;
mod verify_cache;
mod wallet;

use crate::config::Config;
use crate::hsm::{Hsm, HsmError, KeyHandles};
use crate::pool::Pool;
use crate::rowmac::Sealer;
use crate::store::Store;
use anyhow::{Context, Result};
use cryptoki::session::Session;
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// State of an HSM worker thread.
pub struct HsmWorker {
    pub session: Session,
    /// The HSM epoch the session was opened in.
    pub epoch: u64,
    pub keys: KeyHandles,
    pub hsm: Arc<Hsm>,
}

impl HsmWorker {
    pub fn new(hsm: Arc<Hsm>, keys: KeyHandles) -> Result<Self, HsmError> {
        let epoch = hsm.epoch();
        Ok(Self {
            session: hsm.session()?,
            epoch,
            keys,
            hsm,
        })
    }

    /// A session key made on this worker's session.
    pub fn session_key(&self, handle: cryptoki::object::ObjectHandle) -> crate::hsm::SessionKey {
        crate::hsm::SessionKey {
            handle,
            epoch: self.epoch,
        }
    }
}

/// What every core shares.
pub struct Shared {
    /// The running config: the file as loaded at start, with the settings
    /// [`Config::reloaded`] names as live taken from each reload since.
    cfg: arc_swap::ArcSwap<Config>,
    /// The file's config in force, before the start adjusted it.
    file: std::sync::Mutex<Config>,
    /// Bumped at each reload that changed a live setting, so each core
    /// re-reads its per-core copies (source limits, market links).
    cfg_epoch: std::sync::atomic::AtomicU64,
    pub tls: Arc<ServerConfig>,
    /// Password checks (and other registry or ledger reads) on the fair
    /// auth pool, within each terminal's rate.
    pub auth: auth::Checks,
    /// Exchanges each user may start (`exchange.per_user_per_s`).
    pub exchanges: std::sync::Mutex<crate::limits::Buckets<String>>,
    pub hsm_pool: Pool<HsmWorker>,
    /// Session objects to destroy that found the HSM queue full.
    pub owed: Arc<exchange::Owed>,
    pub hsm: Arc<Hsm>,
    /// Registered markets, kept in step with the registry.
    pub markets: Arc<markets::Markets>,
    pub ledger: Arc<dyn crate::wallet::Ledger>,
    /// The voucher issuer's public key (SPKI DER), if top-ups are enabled.
    pub voucher_issuer: Option<Vec<u8>>,
    /// Released home-card keys, one per user.
    pub released: released::Keys,
    /// Terminals revoked since start, which open sessions must not outlive.
    pub revoked: Arc<revoke::Revoked>,
    /// Each core's proof that its loop turns (the systemd watchdog's).
    pub heartbeats: crate::service::Heartbeats,
}

/// Users whose exchange rate is followed (`limits::Buckets`).
const MAX_RATED_USERS: usize = 100_000;

impl Shared {
    /// The running config.
    pub fn cfg(&self) -> arc_swap::Guard<Arc<Config>> {
        self.cfg.load()
    }

    pub fn cfg_epoch(&self) -> u64 {
        self.cfg_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes the live settings of `new` (a reloaded file); says which
    /// sections it applied and which wait for a restart.
    pub fn reconfigure(&self, new: &Config) -> crate::config::Reload {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let reload = file.reloaded(&self.cfg.load(), new);
        if !reload.applied.is_empty() {
            *file = reload.file.clone();
            let c = &reload.config;
            self.auth.set_limits(&c.auth);
            self.exchanges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_rate(c.exchange.per_user_rate());
            self.cfg.store(Arc::new(c.clone()));
            self.cfg_epoch
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        reload
    }

    /// Takes one exchange from `user`'s rate; `Err(ms)`: wait that long.
    pub fn exchange_allowed(&self, user: &str) -> Result<(), u64> {
        self.exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(user, 1, crate::limits::mono_ms())
    }
}

/// Reloads a running broker (SIGHUP, `systemctl reload`).
#[derive(Clone)]
pub struct Reloader {
    markets: crossbeam_channel::Sender<()>,
    shared: Arc<Shared>,
}

impl Reloader {
    /// Re-reads the registry's markets now rather than at the next poll.
    /// Users and terminals are read at every login, revocations within
    /// their poll, so the markets are all a reload needs to hurry.
    pub fn registries(&self) {
        let _ = self.markets.try_send(());
    }

    /// Runs on the live settings of `new` from the next connection, check
    /// or exchange on ([`Config::reloaded`]).
    pub fn config(&self, new: &Config) -> crate::config::Reload {
        self.shared.reconfigure(new)
    }
}

/// A running broker.
pub struct Broker {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ledger: Arc<dyn crate::wallet::Ledger>,
    /// Drains the notification outbox; stops with the broker.
    _mailer: crate::wallet::mailer::Mailer,
    /// Wakes the markets watcher (SIGHUP).
    reload: crossbeam_channel::Sender<()>,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Broker {
    /// Opens the HSM and the registry, issues the TLS key, binds, and starts
    /// the core threads.
    pub fn start(mut cfg: Config) -> Result<Self> {
        let file = cfg.clone();
        let hsm = Arc::new(Hsm::open(&cfg).context("opening the HSM")?);
        let keys = hsm.key_handles()?;
        // Rows verified by any thread of this process, and the newest
        // generation seen of each (rowmac): shared by the auth workers and
        // the markets watcher.
        let seen = Arc::new(crate::rowmac::Seen::default());
        let sealed = {
            let (hsm, seen, db) = (hsm.clone(), seen.clone(), cfg.db_path());
            move || -> Result<Store> {
                Store::open_sealed(&db, Sealer::hsm(hsm.clone(), seen.clone())?)
            }
        };
        let store = sealed()?;
        let ca = |label| {
            store
                .meta_get(label)?
                .with_context(|| format!("{label} certificate missing; run `keybroker init`"))
        };
        let broker_ca = ca(crate::hsm::labels::BROKER_CA)?;
        let terminal_ca = ca(crate::hsm::labels::TERMINAL_CA)?;
        let provider = tls::provider();
        let session = hsm.session()?;
        let certifier = tls::certifier(
            &hsm,
            &session,
            broker_ca,
            keys.broker_ca,
            cfg.broker.server_names.clone(),
            cfg.broker.tls_cert_hours,
        )?;
        let resolver = Arc::new(tls::RotatingCert::new(
            certifier.issue(&session, &provider)?,
        ));
        drop(session);
        certifier.spawn_rotation(hsm.clone(), resolver.clone(), provider.clone());
        let builder = markets::Builder {
            provider: provider.clone(),
            resolver: resolver.clone(),
        };
        let markets = Arc::new(markets::Markets::default());
        let (reload, reloads) = crossbeam_channel::bounded(1);
        markets::spawn_watcher(store, markets.clone(), builder, reloads)
            .context("watching the registry for markets")?;
        // Each core links to each market: a descriptor apiece, for the
        // markets registered and room for 16 (they can be added live).
        let links = (cfg.cores() * markets.snapshot().len().max(16)) as u64;
        cfg.broker.max_connections_per_core = crate::net::fds::fit_caps(
            cfg.cores(),
            links,
            &[(
                "broker.max_connections_per_core",
                cfg.broker.max_connections_per_core,
            )],
        )?[0];
        let period = Duration::from_secs(cfg.broker.ticket_hours * 3600);
        let ticketer = tickets::HsmTicketer::new(
            &hsm,
            period,
            cfg.broker.ticket_lifetime(),
            cfg.broker.ticket_replay_entries,
        )?;
        spawn_ticket_refresh(hsm.clone(), ticketer.clone(), period);
        let tls = tls::server_config(provider, &terminal_ca, resolver, ticketer)?;

        let auth = auth::Checks::start(&cfg, sealed)?;
        let exchanges = std::sync::Mutex::new(crate::limits::Buckets::new(
            cfg.exchange.per_user_rate(),
            MAX_RATED_USERS,
        ));
        let h = hsm.clone();
        let hsm_pool = Pool::start("hsm", cfg.hsm.workers, cfg.hsm.queue, move |_| {
            HsmWorker::new(h.clone(), keys)
        })?;

        let (ledger, mailer, voucher_issuer) = open_wallet(&cfg, hsm.clone())?;
        crate::metrics::init();
        let admin_addr = start_admin(&cfg, hsm.clone())?;
        let cores = cfg.cores();
        let place = crate::net::cores::Placement::for_cores(cores, cfg.broker.pin_cores);
        let (listeners, addr) =
            crate::net::listen::reuseport_group(cfg.broker.listen, cores, 1024, place.steered())
                .context("binding the access channel")?;
        let released = released::Keys::new(Duration::from_secs(cfg.hsm.key_linger_s));
        let revoked = Arc::new(revoke::Revoked::default());
        let (to_cores, from_watcher): (Vec<_>, Vec<_>) = (0..listeners.len())
            .map(|_| futures_channel::mpsc::unbounded())
            .unzip();
        revoke::spawn_watcher(cfg.db_path(), revoked.clone(), to_cores)
            .context("watching the registry for revocations")?;
        let shared = Arc::new(Shared {
            cfg: arc_swap::ArcSwap::from_pointee(cfg),
            file: std::sync::Mutex::new(file),
            cfg_epoch: Default::default(),
            tls,
            auth,
            exchanges,
            hsm_pool,
            owed: Default::default(),
            hsm,
            markets,
            ledger: ledger.clone(),
            voucher_issuer,
            released,
            revoked,
            heartbeats: crate::service::Heartbeats::new(listeners.len()),
        });
        released::spawn_sweeper(&shared)?;
        let mut threads = Vec::new();
        for (i, (l, revocations)) in listeners.into_iter().zip(from_watcher).enumerate() {
            let shared = shared.clone();
            let cpus = place.cpus_of(i);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("core-{i}"))
                    .spawn(move || {
                        if let Err(e) = conn::run_core(i, cpus, l, shared, revocations) {
                            tracing::error!(core = i, error = %e, "core thread stopped");
                        }
                    })?,
            );
        }
        tracing::info!(%addr, cores, pinned = place.steered(), "access channel listening");
        Ok(Self {
            addr,
            admin_addr,
            ledger,
            _mailer: mailer,
            reload,
            shared,
            threads,
        })
    }

    /// The cores' heartbeats, for the systemd watchdog.
    pub fn heartbeats(&self) -> crate::service::Heartbeats {
        self.shared.heartbeats.clone()
    }

    /// What SIGHUP drives.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            markets: self.reload.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Blocks until every core thread ends (they run until the process exits).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

type Wallet = (
    Arc<dyn crate::wallet::Ledger>,
    crate::wallet::mailer::Mailer,
    Option<Vec<u8>>,
);

/// Starts the mailer on the outbox of the ledger it was made for.
pub type StartMailer = Box<
    dyn FnOnce(
        crate::wallet::mailer::MailerConfig,
    ) -> crate::wallet::WalletResult<crate::wallet::mailer::Mailer>,
>;

/// Where the configured ledger anchors its head; a writer that anchors.
pub fn anchor_config(cfg: &Config) -> crate::wallet::anchor::AnchorConfig {
    let mut a = crate::wallet::anchor::AnchorConfig::new(cfg.path(&cfg.wallet.anchor_file));
    a.interval = Duration::from_millis(cfg.wallet.anchor_interval_ms);
    a
}

/// The configured ledger (`wallet.backend`), its writer owning an HSM
/// session for the HMAC chain and anchoring as `anchor` says, and the
/// outbox its mailer drains.
pub fn open_ledger(
    cfg: &Config,
    hsm: Arc<Hsm>,
    anchor: crate::wallet::anchor::AnchorConfig,
) -> Result<(Arc<dyn crate::wallet::Ledger>, StartMailer)> {
    use crate::config::LedgerBackend;
    use crate::wallet::{
        ChainMac, HsmChainMac, LedgerConfig, PgConnect, PgLedger, SqliteLedger, mailer::Mailer,
        pg::PgOutbox,
    };
    let w = &cfg.wallet;
    let lc = LedgerConfig {
        queue: w.queue,
        group_max: w.group_max,
        currencies: w.currencies.clone(),
        anchor: Some(anchor),
        clock: crate::clock::system(),
    };
    let mac: crate::wallet::ledger::MacFactory =
        Box::new(move || Ok(Box::new(HsmChainMac::new(hsm)?) as Box<dyn ChainMac>));
    Ok(match w.backend {
        LedgerBackend::Sqlite => {
            let path = cfg.path(&w.ledger);
            let l = Arc::new(SqliteLedger::open(&path, lc, mac).context("opening the ledger")?);
            let ledger = l.clone();
            (
                l,
                Box::new(move |mc| Mailer::start_ledger(&ledger, &path, mc)),
            )
        }
        LedgerBackend::Postgres => {
            anyhow::ensure!(
                !w.postgres_url.is_empty(),
                "wallet.backend = \"postgres\" needs wallet.postgres_url"
            );
            let db = PgConnect {
                url: w.postgres_url.clone(),
                password_file: (!w.password_file.as_os_str().is_empty())
                    .then(|| cfg.path(&w.password_file)),
            };
            let l = PgLedger::connect(&db, lc, mac).context("opening the PostgreSQL ledger")?;
            (
                Arc::new(l),
                Box::new(move |mc| Mailer::start_outbox(PgOutbox::connect(&db)?, mc)),
            )
        }
    })
}

/// The ledger, the mailer, and the voucher issuer's key.
fn open_wallet(cfg: &Config, hsm: Arc<Hsm>) -> Result<Wallet> {
    use crate::wallet::mailer;
    let w = &cfg.wallet;
    let (ledger, start_mailer) = open_ledger(cfg, hsm, anchor_config(cfg))?;
    if let Some(why) = ledger.refusing() {
        anyhow::bail!("the ledger refuses writes: {why}");
    }
    let transport = if w.smtp_relay.is_empty() {
        mailer::Transport::Maildir(cfg.data_dir.join("mail"))
    } else {
        let (host, port) = w
            .smtp_relay
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
            .context("wallet.smtp_relay must be host:port")?;
        mailer::Transport::Smtp { host, port }
    };
    let mut mc = mailer::MailerConfig::new(transport);
    mc.from = w.mail_from.clone();
    let mailer = start_mailer(mc).context("starting the mailer")?;
    let issuer = if w.voucher_issuer.as_os_str().is_empty() {
        None
    } else {
        let p = cfg.path(&w.voucher_issuer);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Some(crate::wallet::voucher::pem_der(&text, "PUBLIC KEY").context("voucher issuer key")?)
    };
    Ok((ledger, mailer, issuer))
}

/// Re-derives the ticket keys as epochs pass (a quarter period apart).
fn spawn_ticket_refresh(hsm: Arc<Hsm>, t: Arc<tickets::HsmTicketer>, period: Duration) {
    let every = (period / 4).min(Duration::from_secs(3600));
    let spawned = std::thread::Builder::new().name("ticket-keys".into()).spawn(move || {
        loop {
            std::thread::sleep(every);
            if let Err(e) = t.refresh(&hsm) {
                tracing::error!(error = %e, "ticket key refresh failed; keeping the current keys");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the ticket key thread");
    }
}

/// The admin listener, and a monitor that keeps `keybroker_hsm_up` current.
fn start_admin(cfg: &Config, hsm: Arc<Hsm>) -> Result<SocketAddr> {
    let fault: crate::admin::Fault = cfg.admin.fault_injection.then(|| {
        let hsm = hsm.clone();
        Arc::new(move || {
            tracing::warn!("fault injection: closing every HSM session");
            hsm.close_all_sessions().map_err(|e| e.to_string())
        }) as Arc<dyn Fn() -> Result<(), String> + Send + Sync>
    });
    let h = hsm.clone();
    std::thread::Builder::new()
        .name("hsm-monitor".into())
        .spawn(move || {
            loop {
                crate::metrics::hsm_up(h.ping());
                std::thread::sleep(Duration::from_secs(5));
            }
        })?;
    let db = cfg.db_path();
    let ready: crate::admin::ReadyCheck = Arc::new(move || {
        if !hsm.ping() {
            return Err("the HSM does not answer".into());
        }
        Store::open(&db)
            .and_then(|s| s.revocations_head())
            .map(drop)
            .map_err(|e| format!("the registry does not open: {e}"))
    });
    crate::admin::start(cfg.admin.listen, ready, fault)
}

pub use crate::net::core_runtime;

pub(crate) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}
