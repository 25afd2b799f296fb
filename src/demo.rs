//! `keybroker demo`: the whole flow on loopback, in one process.
//!
//! ```text
//! reference market (in process) ◄── broker kx=software ◄── demo terminals (alice, bob)
//!                               ◄── broker kx=hsm      ◄──┘
//! ```
//!
//! Each demo terminal (enrolled by `demo-enroll`) logs in (after a wrong
//! password that must be refused), releases, has both brokers agree keys
//! with the market in full and partial mode, and talks to the market on the
//! direct channel. Ends with one summary line starting `demo ok:`.

use crate::broker::Broker;
use crate::config::{Config, Kx};
use crate::market;
use crate::proto::ErrorCode;
use crate::store::{MarketRecord, Store};
use crate::terminal::{Brokered, Direct, Terminal, TerminalConfig};
use crate::wallet;
use anyhow::{Context, Result, bail};
use std::time::Duration;

pub const DEMO_USERS: [&str; 2] = ["alice", "bob"];
/// The reference market `make run` starts beside the broker, on fixed
/// loopback ports (the broker's are fixed too: 7443, 9464).
pub const RUN_MARKET: &str = "m1";
const RUN_MARKET_LISTEN: &str = "127.0.0.1:8443";
const RUN_MARKET_DIRECT: &str = "127.0.0.1:8444";
const MARKET: &str = "demo-market";
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Tally {
    logins: u32,
    exchanges: u32,
    direct_requests: u32,
    purchases: u32,
    cancels: u32,
    topups: u32,
    refusals_checked: u32,
    errors: u32,
}

/// The demo's voucher issuer: a key pair under <data dir>/demo/issuer.
fn issuer(cfg: &Config) -> Result<std::path::PathBuf> {
    let dir = cfg.data_dir.join("demo").join("issuer");
    if !dir.join("issuer.pub").exists() {
        std::fs::create_dir_all(&dir)?;
        let (private, public) = wallet::voucher::generate_issuer_key()?;
        crate::enroll::write_private(&dir.join("issuer.key"), private.as_bytes())?;
        std::fs::write(dir.join("issuer.pub"), public)?;
    }
    Ok(std::fs::canonicalize(dir)?)
}

/// A fresh 50 EUR voucher for `user`, valid `days`, signed by the demo
/// issuer key in `issuer`.
fn demo_voucher(issuer: &std::path::Path, user: &str, days: i64) -> Result<Vec<u8>> {
    let key = zeroize::Zeroizing::new(wallet::voucher::pem_der(
        &std::fs::read_to_string(issuer.join("issuer.key"))?,
        "PRIVATE KEY",
    )?);
    let amount = wallet::Amount::new(5_000, "EUR")?;
    let expiry = wallet::now_ms() + days * 86_400_000;
    Ok(wallet::voucher::issue(&key, user, amount, expiry)?.1)
}

/// What `make run` needs beside the demo users, idempotently: the reference
/// market's keys and config under `<data>/market/`, registered with the
/// broker; the voucher issuer and a fresh 50 EUR voucher per demo user
/// (`<data>/demo/<user>/voucher.bin`, single use: each run makes a new
/// one); and `<data>/keybroker.toml`, which names the issuer. Returns the
/// market's config file.
pub fn prepare_run(cfg: &Config, store: &Store) -> Result<std::path::PathBuf> {
    let dir = cfg.data_dir.join("market");
    let market_config = market::setup::init(&market::setup::InitArgs {
        dir: &dir,
        id: RUN_MARKET,
        broker_pki: &cfg.pki_dir(),
        listen: RUN_MARKET_LISTEN,
        direct_listen: RUN_MARKET_DIRECT,
        allowed_users: &["*".to_owned()],
    })?;
    if !store.has_market(RUN_MARKET)? {
        crate::enroll::market_add(
            store,
            RUN_MARKET,
            RUN_MARKET_LISTEN,
            &dir.join("market-ca.crt"),
        )?;
    }
    let issuer = issuer(cfg)?;
    for user in DEMO_USERS {
        let voucher = demo_voucher(&issuer, user, 30)?;
        crate::enroll::write_private(
            &cfg.data_dir.join("demo").join(user).join("voucher.bin"),
            &voucher,
        )?;
    }
    let config = cfg.data_dir.join("keybroker.toml");
    if !config.exists() {
        crate::enroll::write_private(
            &config,
            b"# Written by `keybroker demo-enroll` for `make run`; see ops/keybroker.example.toml.\n\
              # The data directory comes from --data-dir.\n\
              [wallet]\nvoucher_issuer = \"demo/issuer/issuer.pub\"\n",
        )?;
    }
    Ok(market_config)
}

/// The commands `make run` prints, for a second shell: each works against
/// the running appliance.
pub fn try_it(data_dir: &std::path::Path) -> String {
    let d = data_dir.display();
    format!(
        "Try it from a second shell (the appliance is {d}/: broker 127.0.0.1:7443, market {RUN_MARKET} at {RUN_MARKET_LISTEN}):\n\n\
         KB=target/release/keybroker; D={d}/demo/alice\n\
         S=\"--dir $D --user alice --access-password-file $D/access.pw --release-password-file $D/release.pw\"\n\
         $KB terminal exchange $S --market {RUN_MARKET} --request 'hello market'\n\
         $KB terminal topup $S --voucher $D/voucher.bin\n\
         $KB terminal purchase $S --market {RUN_MARKET} --amount 1200 --order-ref 'try it' --idempotency-key \"try-$(date +%s)\" | tee $D/purchase.txt\n\
         $KB terminal cancel $S --market {RUN_MARKET} --decision \"$(awk '/^decision/ {{print $2}}' $D/purchase.txt | tr -d :)\"\n\
         $KB --data-dir {d} wallet balance alice\n\
         $KB --data-dir {d} wallet history alice\n\
         $KB --data-dir {d} status\n"
    )
}

/// Top-up with a fresh voucher, a purchase whose receipt the market
/// accepts, an idempotent retry, and a cancel with the market's authorisation.
fn wallet_flow(
    t: &mut Terminal,
    user: &str,
    p2: &[u8],
    issuer: &std::path::Path,
    tally: &mut Tally,
) -> Result<()> {
    let voucher = demo_voucher(issuer, user, 1)?;
    let topped = t.top_up(&voucher, p2)?;
    tally.topups += 1;
    match t.top_up(&voucher, p2) {
        Err(e) if e.code() == Some(ErrorCode::VoucherUsed) => tally.refusals_checked += 1,
        other => bail!("a used voucher was not refused: {other:?}"),
    }
    let mut nonce = [0u8; 8];
    rand::fill(&mut nonce);
    let idem = format!("demo-{}", hex::encode(nonce));
    let (after, receipt) = t.purchase(MARKET, 1_200, "EUR", "demo order", &idem)?;
    if after != topped - 1_200 {
        bail!("the purchase debited {} instead of 1200", topped - after);
    }
    let (again, _) = t.purchase(MARKET, 1_200, "EUR", "demo order", &idem)?;
    if again != after {
        bail!("a retried purchase debited twice");
    }
    tally.purchases += 1;
    let b = t.exchange(MARKET)?;
    let mut d = Direct::connect(&b, TIMEOUT)?;
    let decision = d.present_receipt(&receipt)?;
    let auth = d.cancel_authorisation(&decision)?;
    if t.cancel(&decision, auth)? != topped {
        bail!("the cancel did not refund the purchase");
    }
    tally.cancels += 1;
    // Money moves once: the refunded decision's receipt is refused by the
    // market, and a retried purchase gets no fresh receipt.
    if d.present_receipt(&receipt).is_ok() {
        bail!("the market accepted a refunded decision's receipt");
    }
    tally.refusals_checked += 1;
    match t.purchase(MARKET, 1_200, "EUR", "demo order", &idem) {
        Err(e) if e.code() == Some(ErrorCode::AlreadyCancelled) => tally.refusals_checked += 1,
        other => bail!("a refunded purchase was answered again: {other:?}"),
    }
    Ok(())
}

/// Starts the demo market on free ports and registers its current endpoint.
fn start_market(cfg: &Config) -> Result<market::server::MarketServer> {
    let dir = cfg.data_dir.join("demo").join("market");
    let path = market::setup::init(&market::setup::InitArgs {
        dir: &dir,
        id: MARKET,
        broker_pki: &cfg.pki_dir(),
        listen: "127.0.0.1:0",
        direct_listen: "127.0.0.1:0",
        allowed_users: &["*".to_owned()],
    })?;
    let m = market::server::start(&path)?;
    let store = crate::enroll::Admin::open(cfg)?.store;
    store.market_remove(MARKET)?;
    store.market_add(&MarketRecord {
        id: MARKET.into(),
        endpoint: m.addr.to_string(),
        ca_pem: std::fs::read_to_string(dir.join("market-ca.crt"))?,
    })?;
    Ok(m)
}

pub fn run(mut cfg: Config) -> Result<()> {
    let _market = start_market(&cfg)?;
    let issuer = issuer(&cfg)?;
    cfg.wallet.voucher_issuer = issuer.join("issuer.pub");
    cfg.broker.listen = "127.0.0.1:0".parse().expect("valid address");
    cfg.admin.listen = "127.0.0.1:0".parse().expect("valid address");
    let mut brokers = Vec::new();
    for kx in [Kx::Software, Kx::Hsm] {
        let mut c = cfg.clone();
        c.exchange.kx = kx;
        brokers.push((kx, Broker::start(c)?));
    }
    let mut tally = Tally::default();
    for user in DEMO_USERS {
        let dir = cfg.data_dir.join("demo").join(user);
        let read = |f: &str| {
            std::fs::read(dir.join(f))
                .with_context(|| format!("{}: run `keybroker demo-enroll`", dir.join(f).display()))
        };
        let (p1, p2) = (read("access.pw")?, read("release.pw")?);
        let tc = TerminalConfig::load(&dir)?;
        for (kx, broker) in &brokers {
            let with_wallet = *kx == Kx::Software;
            let r = session(broker, &tc, user, &p1, &p2, &mut tally).and_then(|mut t| {
                if with_wallet {
                    wallet_flow(&mut t, user, &p2, &issuer, &mut tally)?;
                }
                t.logout()?;
                Ok(())
            });
            match r {
                Ok(()) => println!(
                    "{user} via kx={kx:?}: login, release, full and partial exchanges, direct requests{}: ok",
                    if with_wallet {
                        ", top-up, purchase, receipt, cancel"
                    } else {
                        ""
                    }
                ),
                Err(e) => {
                    tally.errors += 1;
                    println!("{user} via kx={kx:?}: FAILED: {e:#}");
                }
            }
        }
    }
    let audit = brokers[0].1.ledger.audit()?;
    if !audit.ok {
        tally.errors += 1;
    }
    let line = format!(
        "logins={} exchanges={} direct_requests={} purchases={} cancels={} topups={} audit={} ({} entries) refusals_checked={} errors={}",
        tally.logins,
        tally.exchanges,
        tally.direct_requests,
        tally.purchases,
        tally.cancels,
        tally.topups,
        if audit.ok { "ok" } else { "FAILED" },
        audit.entries,
        tally.refusals_checked,
        tally.errors
    );
    if tally.errors > 0 {
        bail!("demo failed: {line}");
    }
    println!("demo ok: {line}");
    Ok(())
}

fn direct(b: &Brokered, user: &str, tally: &mut Tally) -> Result<()> {
    let mut d = Direct::connect(b, TIMEOUT)?;
    for i in 0..2 {
        let req = format!("demo order {i}");
        let answer = d.request(req.as_bytes())?;
        if !String::from_utf8_lossy(&answer).contains(&format!("to {user}: {req}")) {
            bail!("unexpected answer from the market");
        }
        tally.direct_requests += 1;
    }
    Ok(())
}

fn session(
    broker: &Broker,
    tc: &TerminalConfig,
    user: &str,
    p1: &[u8],
    p2: &[u8],
    tally: &mut Tally,
) -> Result<Terminal> {
    let mut t = Terminal::connect(broker.addr, tc, TIMEOUT)?;
    match t.login(user, b"not the password") {
        Err(e) if e.code() == Some(ErrorCode::WrongPassword) => tally.refusals_checked += 1,
        other => bail!("a wrong password was not refused: {other:?}"),
    }
    t.login(user, p1)?;
    tally.logins += 1;
    match t.exchange(MARKET) {
        Err(e) if e.code() == Some(ErrorCode::NotReleased) => tally.refusals_checked += 1,
        other => bail!("an exchange before release was not refused: {other:?}"),
    }
    t.release(p2)?;
    for partial in [false, true] {
        let b = if partial {
            t.exchange_partial(MARKET)?
        } else {
            t.exchange(MARKET)?
        };
        tally.exchanges += 1;
        direct(&b, user, tally)?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    /// README's quick start is what `make run` prints, line for line.
    #[test]
    fn the_readme_quick_start_is_the_printed_block() {
        let readme = include_str!("../README.md");
        let block = super::try_it(std::path::Path::new("var"));
        let commands: Vec<&str> = block.lines().skip(2).filter(|l| !l.is_empty()).collect();
        assert!(commands.len() >= 8, "{block}");
        let at = readme
            .find(commands[0])
            .expect("README has the try-it block");
        let readme_lines: Vec<&str> = readme[at..].lines().take(commands.len()).collect();
        assert_eq!(readme_lines, commands);
    }
}
