//! keybroker-bench: drives a real broker and reference market over
//! loopback, measures throughput, broker CPU per operation against the
//! crypto floor measured in the same run, and latency (docs/BENCH.md).

/// The broker's allocator, also under the C libraries (SoftHSM, OpenSSL):
/// the floor's HSM and TLS items must run on what the broker runs on.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod env;
mod floor;
mod load;
mod measure;
mod ops;
mod procs;
mod report;
mod scenarios;
use measure::{Cpu, PEAK_STEPS, Plan, build_ops, entry, measured, peak};
use scenarios::{P99_TARGET_MS, connect, exchange, idle, mixed, purchase, resume};
mod transport;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use env::{Broker, Env, Settings};
use indicatif::{ProgressBar, ProgressStyle};
use load::{Op, RunResult};
use report::Entry;
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SCENARIOS: &[&str] = &[
    "connect",
    "resume",
    "exchange_software",
    "exchange_hsm",
    "mixed",
    "idle",
    "purchase",
];

#[derive(Parser)]
#[command(about = "Load harness for keybroker (see docs/BENCH.md)")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// connect, resume, exchange_software, exchange_hsm, mixed, idle, or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Open-loop target rate, operations per second (default: per scenario).
    #[arg(long)]
    rate: Option<f64>,
    /// Length of each open-loop run (and of each closed-loop step), seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Worker threads (closed loop: a fixed count instead of the search).
    #[arg(long)]
    workers: Option<usize>,
    /// Closed loop: find the peak (more workers until throughput stops growing).
    #[arg(long)]
    closed: bool,
    /// A short run (CI smoke test).
    #[arg(long)]
    quick: bool,
    /// JSON report; the SVG chart goes beside it as latency.svg
    /// (report-X.json: latency-X.svg).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Concurrent idle connections for `idle` (default 10000, quick 500).
    #[arg(long)]
    idle_conns: Option<usize>,
    /// argon2id memory for the bench users' password hashes, KiB.
    #[arg(long, default_value_t = 19_456)]
    argon2_m_kib: u32,
    /// argon2id passes.
    #[arg(long, default_value_t = 2)]
    argon2_t: u32,
    /// The brokers' `hsm.dispatch`: inline (each core's own session; the
    /// right choice for SoftHSM, which is in-process) or pool (worker
    /// threads, as for a network HSM).
    #[arg(long, default_value = "inline")]
    hsm_dispatch: String,
    /// The brokers' ledger (`wallet.backend`).
    #[arg(long, value_enum, default_value_t = Ledger::Sqlite)]
    ledger: Ledger,
    /// With `--ledger postgres`: an empty database to use, libpq `key=value`
    /// form without a password; default: a throwaway cluster on loopback,
    /// started and stopped by the bench.
    #[arg(long)]
    postgres_url: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Ledger {
    Sqlite,
    Postgres,
}

impl Ledger {
    fn name(self) -> &'static str {
        match self {
            Ledger::Sqlite => "sqlite",
            Ledger::Postgres => "postgres",
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Measures the crypto floor against a bench data dir; prints JSON.
    #[command(hide = true)]
    Floor {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        terminal: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long)]
        quick: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Some(Cmd::Floor {
            config,
            terminal,
            user,
            quick,
        }) => floor::run(config, terminal, user, *quick).map(|v| println!("{v}")),
        None => run(&cli),
    };
    if let Err(e) = r {
        eprintln!("keybroker-bench: {e:#}");
        std::process::exit(1);
    }
}

/// Everything a scenario needs.
/// Fields drop in order: the broker stops before the market in `env`.
struct Ctx<'a> {
    cli: &'a Cli,
    broker: Option<Broker>,
    env: Env,
    floors: Value,
    entries: Vec<Entry>,
    /// Closed-loop peak of exchange_software, ops/s.
    sw_peak: Option<f64>,
    /// The throwaway PostgreSQL cluster's postmaster, whose process tree's
    /// CPU is reported beside the broker's.
    ledger_pid: Option<u32>,
}

impl Ctx<'_> {
    fn broker(&mut self, kx: &str) -> Result<(std::net::SocketAddr, u32)> {
        if self.broker.as_ref().is_none_or(|b| b.kx != kx) {
            self.broker = None; // kills the running one first
            let b = self.env.broker(kx)?;
            eprintln!("broker kx={kx} listening on {} (pid {})", b.addr, b.pid());
            self.broker = Some(b);
        }
        let b = self.broker.as_ref().expect("just started");
        Ok((b.addr, b.pid()))
    }

    fn floor_us(&self, name: &str) -> f64 {
        self.floors["floors"][name]["cpu_us_per_op"]
            .as_f64()
            .unwrap_or(0.0)
    }

    fn item_us(&self, name: &str) -> f64 {
        self.floors["items"][name]["cpu_us_per_op"]
            .as_f64()
            .unwrap_or(0.0)
    }

    fn open_secs(&self) -> f64 {
        self.cli
            .duration
            .unwrap_or(if self.cli.quick { 2.0 } else { 10.0 })
    }

    fn step_secs(&self) -> f64 {
        self.cli
            .duration
            .unwrap_or(if self.cli.quick { 1.0 } else { 3.0 })
    }

    /// Password checks per second the auth pool can do on this machine
    /// (2 threads, from the floor's argon2id figure).
    fn argon2_capacity(&self) -> f64 {
        let us = self.item_us("argon2id_password_check").max(1.0);
        2.0 * 1e6 / us
    }
}

fn style(closed: bool) -> ProgressStyle {
    let t = if closed {
        "{prefix:>28} {spinner} [{elapsed_precise}] {pos} ops {per_sec}"
    } else {
        "{prefix:>28} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec}"
    };
    ProgressStyle::with_template(t).expect("template")
}

/// Where the bench writes, and only there: the workspace's `target/bench`
/// (`$CARGO_TARGET_DIR/bench` when set), wherever the binary was started
/// from or copied to.
fn bench_root() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        },
        PathBuf::from,
    );
    let root = target.join("bench");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    Ok(root.canonicalize()?)
}

/// `--out`, which must name a file under `root` (a relative path is taken
/// from the current directory, as a shell user means it).
fn report_path(out: Option<&Path>, root: &Path) -> Result<PathBuf> {
    let Some(out) = out else {
        return Ok(root.join("report.json"));
    };
    let name = out.file_name().context("--out names no file")?;
    let dir = match out.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => std::env::current_dir()?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if !dir.starts_with(root) {
        bail!(
            "--out {}: the bench writes only under {}",
            out.display(),
            root.display()
        );
    }
    Ok(dir.join(name))
}

fn run(cli: &Cli) -> Result<()> {
    let exe = std::env::current_exe()?;
    let bindir = exe.parent().context("exe dir")?.to_path_buf();
    let root = bench_root()?;
    let out = report_path(cli.out.as_deref(), &root)?;
    let chosen: Vec<&str> = if cli.scenario == "all" {
        SCENARIOS.to_vec()
    } else {
        cli.scenario.split(',').map(str::trim).collect()
    };
    for s in &chosen {
        if !SCENARIOS.contains(s) {
            bail!("unknown scenario {s:?}; known: {SCENARIOS:?} or all");
        }
    }
    // 10k idle connections: raise the soft descriptor limit to the hard one
    // (the broker inherits it).
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let t0 = Instant::now();
    // Declared before the brokers, so dropped (stopped) after them, also
    // on error.
    let (cluster, postgres_url) = ledger_db(cli)?;
    eprintln!("setting up under {} ...", root.join("run").display());
    let settings = Settings {
        users: if cli.quick { 2 } else { 4 },
        terminals_per_user: if cli.quick { 8 } else { 16 },
        argon2_m_kib: cli.argon2_m_kib,
        argon2_t: cli.argon2_t,
        hsm_dispatch: cli.hsm_dispatch.clone(),
        postgres_url,
    };
    let env = Env::create(bindir.join("keybroker"), root.join("run"), &settings)?;
    eprintln!(
        "set up {} users, {} terminals, market on {} in {:.1}s",
        settings.users,
        env.terminals.len(),
        env.market
            .as_ref()
            .map_or_else(String::new, |m| m.addr.to_string()),
        t0.elapsed().as_secs_f64()
    );
    // The floor, in a child process of this run (SoftHSM wants its config
    // in the environment before any thread starts).
    eprintln!("measuring the crypto floor ...");
    let t = &env.terminals[0];
    let mut fc = Command::new(&exe);
    fc.arg("floor")
        .arg("--config")
        .arg(env.config("software"))
        .arg("--terminal")
        .arg(&t.dir)
        .arg("--user")
        .arg(&t.user)
        .env("SOFTHSM2_CONF", env.softhsm_conf()?)
        .env_remove("KEYBROKER_HSM_PIN");
    if cli.quick {
        fc.arg("--quick");
    }
    let fo = fc.output().context("running the floor")?;
    if !fo.status.success() {
        bail!("floor failed: {}", String::from_utf8_lossy(&fo.stderr));
    }
    let floors: Value = serde_json::from_slice(&fo.stdout).context("floor output")?;
    let mut ctx = Ctx {
        cli,
        env,
        broker: None,
        floors,
        entries: Vec::new(),
        sw_peak: None,
        ledger_pid: cluster.as_ref().and_then(|c| c.postmaster_pid()),
    };
    // Order: software-broker scenarios first, the hsm broker last.
    for s in [
        "connect",
        "resume",
        "exchange_software",
        "mixed",
        "idle",
        "purchase",
        "exchange_hsm",
    ] {
        if !chosen.contains(&s) {
            continue;
        }
        let r = match s {
            "connect" => connect(&mut ctx),
            "resume" => resume(&mut ctx),
            "exchange_software" => exchange(&mut ctx, "software"),
            "exchange_hsm" => exchange(&mut ctx, "hsm"),
            "purchase" => purchase(&mut ctx),
            "mixed" => mixed(&mut ctx),
            _ => idle(&mut ctx),
        };
        r.with_context(|| format!("scenario {s}"))?;
    }
    ctx.broker = None;
    env::remove_old_runs(&root.join("run"));
    let unavailable: Vec<(&str, &str)> = Vec::new();
    let ledger = match (cli.ledger, &cluster) {
        (Ledger::Sqlite, _) => "sqlite (WAL, synchronous=FULL, in the data dir)".to_owned(),
        (Ledger::Postgres, Some(c)) => format!(
            "postgres (throwaway cluster on 127.0.0.1:{}, fsync=on, synchronous_commit=on)",
            c.port
        ),
        (Ledger::Postgres, None) => "postgres (--postgres-url)".to_owned(),
    };
    for e in &mut ctx.entries {
        let wt = &ctx.floors["with_transport"][e.name.as_str()];
        if let Some(us) = wt["cpu_us_per_op"].as_f64() {
            let ratio = e.cpu_us_per_op() / us;
            e.extra
                .insert("floor_with_transport_cpu_us_per_op".into(), json!(us));
            e.extra
                .insert("floor_with_transport_ops_per_cpu_s".into(), json!(1e6 / us));
            e.extra
                .insert("floor_with_transport_ratio".into(), json!(ratio));
        }
    }
    let table = report::table(&ledger, &ctx.entries, &unavailable);
    let mut scenarios = Map::new();
    for e in &ctx.entries {
        scenarios.insert(e.name.clone(), e.json());
    }
    let report = json!({
        "ledger": cli.ledger.name(),
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "nofile_limit": nofile,
        },
        "settings": {
            "users": settings.users,
            "terminals": ctx.env.terminals.len(),
            "argon2_m_kib": cli.argon2_m_kib,
            "argon2_t": cli.argon2_t,
            "hsm_dispatch": cli.hsm_dispatch,
            "broker_cores": 2,
            "quick": cli.quick,
            "closed": cli.closed,
            "ledger": ledger,
        },
        "floor": ctx.floors,
        "scenarios": scenarios,
        "not_available": unavailable.iter().map(|(n, w)| (n.to_string(), json!(w))).collect::<Map<_, _>>(),
        "runtime_s": t0.elapsed().as_secs_f64(),
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    // report-<x>.json gets latency-<x>.svg, so runs side by side keep theirs.
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let svg = out.with_file_name(format!(
        "latency{}.svg",
        stem.strip_prefix("report").unwrap_or("")
    ));
    report::chart(&ctx.entries, &svg, P99_TARGET_MS).context("latency chart")?;
    print_floor(&ctx.floors);
    println!("{table}");
    println!(
        "report {} chart {} ({:.0}s)",
        out.display(),
        svg.display(),
        t0.elapsed().as_secs_f64()
    );
    // The scratch run (data dir, 100,000-odd mails, logs: about 250 MB)
    // goes once the market and brokers are stopped; a run that failed
    // stays for its logs, and the next run moves it aside and removes it.
    let scratch = ctx.env.run.clone();
    drop(ctx);
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    Ok(())
}

/// The PostgreSQL database of `--ledger postgres`: `--postgres-url`, or a
/// fresh database in a throwaway cluster started here (returned, so the
/// caller's drop stops it).
fn ledger_db(
    cli: &Cli,
) -> Result<(
    Option<keybroker::wallet::pg_cluster::PgCluster>,
    Option<String>,
)> {
    match (cli.ledger, &cli.postgres_url) {
        (Ledger::Sqlite, None) => Ok((None, None)),
        (Ledger::Sqlite, Some(_)) => bail!("--postgres-url needs --ledger postgres"),
        (Ledger::Postgres, Some(url)) => {
            if url.contains("password") {
                bail!(
                    "--postgres-url must not carry a password (it is written to the bench's config)"
                );
            }
            Ok((None, Some(url.clone())))
        }
        (Ledger::Postgres, None) => {
            eprintln!("starting a throwaway PostgreSQL cluster ...");
            let c = keybroker::wallet::pg_cluster::PgCluster::start()
                .context("starting the throwaway PostgreSQL cluster")?;
            let url = c.url(&c.new_db("bench")?);
            eprintln!("PostgreSQL on 127.0.0.1:{}", c.port);
            Ok((Some(c), Some(url)))
        }
    }
}

fn print_floor(f: &Value) {
    println!("crypto floor (bench process, one thread, CPU time):");
    if let Some(items) = f["items"].as_object() {
        for (k, v) in items {
            println!(
                "  {k:<48} {:>9.2} µs/op  ±{:.1}%",
                v["cpu_us_per_op"].as_f64().unwrap_or(0.0),
                v["spread_pct"].as_f64().unwrap_or(0.0)
            );
        }
    }
    for (group, label) in [("floors", "floor"), ("with_transport", "+ tcp")] {
        for (k, v) in f[group].as_object().into_iter().flatten() {
            println!(
                "  {label:<5} {k:<42} {:>9.2} µs/op  {:>8.0} ops/cpu-s",
                v["cpu_us_per_op"].as_f64().unwrap_or(0.0),
                v["ops_per_cpu_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_go_under_the_bench_root_only() {
        let root = bench_root().unwrap();
        assert_eq!(report_path(None, &root).unwrap(), root.join("report.json"));
        let inside = root.join("sub").join("report-x.json");
        assert_eq!(report_path(Some(&inside), &root).unwrap(), inside);
        let outside = std::env::temp_dir().join("report.json");
        assert!(report_path(Some(&outside), &root).is_err());
        let escaping = root.join("..").join("report.json");
        assert!(report_path(Some(&escaping), &root).is_err());
        let _ = std::fs::remove_dir(root.join("sub"));
    }
}
