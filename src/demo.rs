//! `keybroker demo`: starts a broker in this process on a free loopback
//! port and drives the demo terminals (enrolled by `demo-enroll`) through
//! the whole flow, then prints one summary line starting `demo ok:`.

use crate::config::Config;
use crate::terminal::{Terminal, TerminalConfig};
use anyhow::{Context, Result, bail};
use std::time::Duration;

pub const DEMO_USERS: [&str; 2] = ["alice", "bob"];

#[derive(Default)]
struct Tally {
    logins: u32,
    releases: u32,
    refusals_checked: u32,
    errors: u32,
}

pub fn run(mut cfg: Config) -> Result<()> {
    cfg.broker.listen = "127.0.0.1:0".parse().expect("valid address");
    let broker = crate::broker::Broker::start(cfg.clone())?;
    let mut tally = Tally::default();
    for user in DEMO_USERS {
        let dir = cfg.data_dir.join("demo").join(user);
        let read = |f: &str| {
            std::fs::read(dir.join(f))
                .with_context(|| format!("{}: run `keybroker demo-enroll`", dir.join(f).display()))
        };
        let (p1, p2) = (read("access.pw")?, read("release.pw")?);
        let tc = TerminalConfig::load(&dir)?;
        match session(&broker, &tc, user, &p1, &p2, &mut tally) {
            Ok(()) => println!("{user}: logged in, X' confirmed, released, logged out"),
            Err(e) => {
                tally.errors += 1;
                println!("{user}: FAILED: {e:#}");
            }
        }
    }
    let line = format!(
        "logins={} releases={} refusals_checked={} errors={}",
        tally.logins, tally.releases, tally.refusals_checked, tally.errors
    );
    if tally.errors > 0 {
        bail!("demo failed: {line}");
    }
    println!("demo ok: {line}");
    Ok(())
}

fn session(
    broker: &crate::broker::Broker,
    tc: &TerminalConfig,
    user: &str,
    p1: &[u8],
    p2: &[u8],
    tally: &mut Tally,
) -> Result<()> {
    let mut t = Terminal::connect(broker.addr, tc, Duration::from_secs(10))?;
    // A wrong first password must be refused with a typed error (and is
    // then cleared by the successful login below).
    match t.login(user, b"not the password") {
        Err(e) if e.code() == Some(crate::proto::ErrorCode::WrongPassword) => {
            tally.refusals_checked += 1
        }
        other => bail!("wrong password was not refused: {other:?}"),
    }
    t.login(user, p1)?;
    tally.logins += 1;
    t.release(p2)?;
    tally.releases += 1;
    t.logout()?;
    Ok(())
}
