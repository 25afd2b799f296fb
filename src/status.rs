//! `keybroker status`: is the running appliance healthy? Read-only: it asks
//! the admin port (`/readyz`, `/metrics`, which change nothing) and reads
//! the registry for the markets that should be up.
//!
//! ```text
//! config ─► admin address ─► GET /readyz, GET /metrics ─► HSM, markets' links, sessions, mail
//! registry ─► the markets that should have a link
//! ```
//!
//! Exits 1 when anything is unhealthy (admin port silent, not ready, HSM
//! down, a registered market with no core connected), so scripts and
//! systemd (`ExecStartPost`, a timer) can use it.

use crate::config::Config;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One HTTP/1.0 GET on loopback: status code and body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("admin port {addr} does not answer (is the broker running?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.take(8 << 20).read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("a malformed HTTP answer")?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((code, body))
}

/// The sum of every sample of `name` whose labels contain `labels`.
fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n == name && l.contains(labels) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

/// Prints the report; `Ok(false)` when something is unhealthy.
pub fn run(cfg: &Config, admin: SocketAddr) -> Result<bool> {
    println!("keybroker {}", env!("CARGO_PKG_VERSION"));
    println!(
        "access channel {}   admin {admin}   data {}",
        cfg.broker.listen,
        cfg.data_dir.display()
    );
    let mut problems = Vec::new();
    let (ready, why) = match get(admin, "/readyz") {
        Ok(r) => r,
        Err(e) => {
            println!("status: UNHEALTHY: {e:#}");
            return Ok(false);
        }
    };
    println!(
        "ready          {}",
        if ready == 200 { "yes" } else { why.trim() }
    );
    if ready != 200 {
        problems.push(format!("not ready: {}", why.trim()));
    }
    let (_, metrics) = get(admin, "/metrics")?;
    let hsm = sample(&metrics, "keybroker_hsm_up", "").unwrap_or(0.0);
    println!("hsm            {}", if hsm >= 1.0 { "up" } else { "DOWN" });
    if hsm < 1.0 {
        problems.push("the HSM does not answer".into());
    }
    let cores = cfg.cores();
    // The registry's rows are checked with the HSM's key (docs/SECURITY.md)
    // where this process can use the HSM; else they are shown unchecked.
    let markets = match crate::enroll::Admin::open(cfg) {
        Ok(a) => a.store.market_list()?,
        Err(e) => {
            println!("registry       rows not checked here ({e:#})");
            crate::store::Store::open(&cfg.db_path())?
                .markets_unchecked()?
                .into_iter()
                .map(Ok)
                .collect()
        }
    };
    if markets.is_empty() {
        println!("markets        none registered (keybroker market add)");
    }
    for m in &markets {
        let m = match m {
            Ok(m) => m,
            Err(bad) => {
                println!("market {:<8} REFUSED: its row {}", bad.key, bad.why);
                problems.push(format!("market {}'s registry row {}", bad.key, bad.why));
                continue;
            }
        };
        let up = sample(
            &metrics,
            "keybroker_market_up",
            &format!("market=\"{}\"", m.id),
        )
        .unwrap_or(0.0);
        let state = if up >= 1.0 { "up" } else { "DOWN" };
        println!(
            "market {:<8} {state}, {up}/{cores} cores connected, {}",
            m.id, m.endpoint
        );
        if up < 1.0 {
            problems.push(format!("market {} is down", m.id));
        }
    }
    let sessions = sample(&metrics, "keybroker_connections", "").unwrap_or(0.0);
    println!("sessions       {sessions} open");
    let mail = sample(&metrics, "keybroker_mail_outbox_pending", "").unwrap_or(0.0);
    println!("mail           {mail} waiting in the outbox");
    if problems.is_empty() {
        println!("status: healthy");
    } else {
        println!("status: UNHEALTHY: {}", problems.join("; "));
    }
    Ok(problems.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_sum_over_cores_and_filter_by_label() {
        let m = "# HELP x\nkeybroker_connections{core=\"0\"} 2\nkeybroker_connections{core=\"1\"} 3\n\
                 keybroker_market_up{market=\"m1\"} 2\nkeybroker_market_up{market=\"m10\"} 0\nkeybroker_hsm_up 1\n";
        assert_eq!(sample(m, "keybroker_connections", ""), Some(5.0));
        assert_eq!(sample(m, "keybroker_market_up", "market=\"m1\""), Some(2.0));
        assert_eq!(
            sample(m, "keybroker_market_up", "market=\"m10\""),
            Some(0.0)
        );
        assert_eq!(sample(m, "keybroker_hsm_up", ""), Some(1.0));
        assert_eq!(sample(m, "keybroker_nothing", ""), None);
    }
}
