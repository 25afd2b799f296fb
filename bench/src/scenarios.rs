//! The scenarios (docs/BENCH.md): each drives a real broker, and market
//! where it needs one, and pushes its entries into the report beside the
//! crypto floor measured in the same run.

use super::*;

/// Workers of the session scenarios (connect, resume): `--workers`
/// (default 16) in open loop; the closed-loop peak search goes up to 64 (one per
/// terminal, as for the exchanges).
fn session_workers(ctx: &Ctx, terminals: usize) -> usize {
    if ctx.cli.closed {
        64.min(terminals)
    } else {
        workers(ctx, 16, terminals)
    }
}

/// `--workers`, else `default`; at least one, at most one per terminal.
fn workers(ctx: &Ctx, default: usize, terminals: usize) -> usize {
    ctx.cli.workers.unwrap_or(default).min(terminals).max(1)
}

pub(crate) fn connect(ctx: &mut Ctx) -> Result<()> {
    let (addr, pid) = ctx.broker("software")?;
    let floor = ctx.floor_us("connect");
    let terms = ctx.env.terminals.clone();
    let mut ops = build_ops(session_workers(ctx, terms.len()), |i| {
        let t = terms[i % terms.len()].clone();
        let tc = ops::no_resume(&t.config);
        Ok(Box::new(ops::Connect { addr, t, tc }) as Box<dyn Op>)
    })?;
    // Two password checks per session.
    let rate = ctx
        .cli
        .rate
        .unwrap_or((0.5 * ctx.argon2_capacity() / 2.0).max(1.0));
    let mut e = run_plan(ctx, "connect", pid, &mut ops, floor, rate)?;
    e.notes
        .push("op = full TLS 1.3 handshake with client cert (no ticket) + login + release (+ logout, untimed)".into());
    e.notes.push(
        "broker_cpu_s excludes the auth-* threads (argon2id, 2 checks per op): see password_check_cpu_ms_per_op".into(),
    );
    ctx.entries.push(e);
    Ok(())
}

fn run_plan(
    ctx: &Ctx,
    name: &str,
    pid: u32,
    ops: &mut [Box<dyn Op>],
    floor: f64,
    rate: f64,
) -> Result<Entry> {
    if ctx.cli.closed {
        return peak(ctx, name, pid, ops, floor);
    }
    let plan = Plan::Open {
        rate,
        secs: ctx.open_secs(),
    };
    let (r, cpu) = measured(ctx, name, pid, ops, &plan);
    Ok(entry(name, &plan, r, &cpu, floor))
}

pub(crate) fn resume(ctx: &mut Ctx) -> Result<()> {
    let (addr, pid) = ctx.broker("software")?;
    let floor = ctx.floor_us("resume");
    let terms = ctx.env.terminals.clone();
    let mut ops = build_ops(session_workers(ctx, terms.len()), |i| {
        ops::Resume::new(addr, terms[i % terms.len()].clone()).map(|o| Box::new(o) as Box<dyn Op>)
    })?;
    let rate = ctx
        .cli
        .rate
        .unwrap_or((0.5 * ctx.argon2_capacity()).max(1.0));
    let mut e = run_plan(ctx, "resume", pid, &mut ops, floor, rate)?;
    e.notes.push(
        "op = TLS 1.3 resumption with a session ticket (asserted) + login (first password only) (+ logout, untimed)".into(),
    );
    e.notes.push(
        "broker_cpu_s excludes the auth-* threads (argon2id, 1 check per op): see password_check_cpu_ms_per_op".into(),
    );
    ctx.entries.push(e);
    Ok(())
}

pub(crate) fn exchange(ctx: &mut Ctx, kx: &str) -> Result<()> {
    let name = format!("exchange_{kx}");
    let (addr, pid) = ctx.broker(kx)?;
    let floor = ctx.floor_us(&name);
    let terms = ctx.env.terminals.clone();
    let n = workers(ctx, terms.len(), terms.len());
    let mut ops = build_ops(n, |i| {
        ops::Session::new(addr, terms[i % terms.len()].clone())
            .map(|s| Box::new(ops::Exchange(s)) as Box<dyn Op>)
    })?;
    let note = "op = Exchange (full proxy) on a released session + Direct::open: the Noise handshake, then one request with X";
    if ctx.cli.rate.is_some() && !ctx.cli.closed {
        let mut e = run_plan(
            ctx,
            &name,
            pid,
            &mut ops,
            floor,
            ctx.cli.rate.unwrap_or(1.0),
        )?;
        e.notes.push(note.into());
        ctx.entries.push(e);
        return Ok(());
    }
    // The peak (closed loop), then open loop at 70% of it.
    let mut e = peak(ctx, &name, pid, &mut ops, floor)?;
    e.notes.push(note.into());
    let peak_rate = e.ops_per_s;
    if kx == "software" {
        ctx.sw_peak = Some(peak_rate);
    }
    ctx.entries.push(e);
    if !ctx.cli.closed {
        let rate = (0.7 * peak_rate).max(1.0);
        let plan = Plan::Open {
            rate,
            secs: ctx.open_secs(),
        };
        let label = format!("{name}_at_70pct");
        let (r, cpu) = measured(ctx, &label, pid, &mut ops, &plan);
        let mut e = entry(&label, &plan, r, &cpu, floor);
        e.notes.push(format!(
            "open loop at 70% of the closed-loop peak ({peak_rate:.0} ops/s); {note}"
        ));
        let met = e.ms(0.99) <= P99_TARGET_MS;
        ctx.entries.push(e);
        if !met {
            within_target(ctx, &name, pid, &mut ops, floor, peak_rate)?;
        }
    }
    Ok(())
}

/// The exchange latency target (issue 5): p99 at 70% of the peak.
pub(crate) const P99_TARGET_MS: f64 = 2.0;

/// Where 70% of the peak misses the p99 target, the highest lower share of
/// the peak that meets it (or the lowest tried), so the report says what
/// load the target holds at.
fn within_target(
    ctx: &mut Ctx,
    name: &str,
    pid: u32,
    ops: &mut [Box<dyn Op>],
    floor: f64,
    peak_rate: f64,
) -> Result<()> {
    const SHARES: [f64; 3] = [0.5, 0.35, 0.25];
    let label = format!("{name}_p99_{P99_TARGET_MS}ms");
    for (i, share) in SHARES.iter().enumerate() {
        let plan = Plan::Open {
            rate: (share * peak_rate).max(1.0),
            secs: ctx.open_secs() / 2.0,
        };
        let (r, cpu) = measured(ctx, &label, pid, ops, &plan);
        let mut e = entry(&label, &plan, r, &cpu, floor);
        let met = e.ms(0.99) <= P99_TARGET_MS;
        if met || i + 1 == SHARES.len() {
            let tried: Vec<String> = SHARES.iter().map(|s| format!("{:.0}", s * 100.0)).collect();
            e.notes.push(format!(
                "open loop at {:.0}% of the closed-loop peak ({peak_rate:.0} ops/s): {} of {}% whose p99 is within {P99_TARGET_MS} ms",
                share * 100.0,
                if met { "the highest" } else { "none" },
                tried.join("/")
            ));
            ctx.entries.push(e);
            break;
        }
    }
    Ok(())
}

/// `purchase`: the closed-loop peak of durable purchases (group commit,
/// full sync, HSM HMAC chain, HSM-signed receipt).
pub(crate) fn purchase(ctx: &mut Ctx) -> Result<()> {
    let (addr, pid) = ctx.broker("software")?;
    let terms = ctx.env.terminals.clone();
    let key_pem = std::fs::read_to_string(ctx.env.run.join("issuer").join("issuer.key"))?;
    let key = keybroker::wallet::voucher::pem_der(&key_pem, "PRIVATE KEY")?;
    let mut funded = std::collections::BTreeSet::new();
    for t in &terms {
        if funded.insert(t.user.clone()) {
            ops::Purchase::fund(addr, t, &key).map_err(anyhow::Error::msg)?;
        }
    }
    // The receipt signature is the crypto a purchase cannot avoid on the
    // broker; the ledger's HMAC and fsync come on top (see docs/BENCH.md).
    let floor = ctx.floor_us("exchange_partial");
    // Group commit needs concurrency to fill a batch while the last one
    // syncs; a terminal may hold several sessions, so the search goes past
    // the number of terminals.
    let n = ctx
        .cli
        .workers
        .unwrap_or(PEAK_STEPS[PEAK_STEPS.len() - 1])
        .max(1);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut ops = build_ops(n, |i| {
        Ok(Box::new(ops::Purchase {
            session: ops::Session::new(addr, terms[i % terms.len()].clone())?,
            next: next.clone(),
        }) as Box<dyn Op>)
    })?;
    let mut e = peak(ctx, "purchase", pid, &mut ops, floor)?;
    let store = match ctx.cli.ledger {
        Ledger::Sqlite => "one group-committed SQLite transaction with synchronous=FULL",
        Ledger::Postgres => {
            "one group-committed PostgreSQL transaction (loopback TCP, fsync=on, synchronous_commit=on)"
        }
    };
    e.notes.push(format!(
        "op = Purchase (debit, decision, mail row: {store}, HSM HMAC chain) + HSM receipt signature; floor = the receipt signature"
    ));
    if ctx.cli.ledger == Ledger::Sqlite {
        drain_mail(ctx, pid, &mut e);
    }
    ctx.entries.push(e);
    Ok(())
}

/// Waits (at most 120 s) for the mailer to deliver what the run queued,
/// and records the mailer's CPU per message it delivered meanwhile (each
/// purchase queues one). A closed-loop run queues faster than the mailer,
/// which shares the two cores, drains; the backlog would otherwise be
/// charged to whatever scenario runs next.
fn drain_mail(ctx: &Ctx, pid: u32, e: &mut report::Entry) {
    let db = ctx.env.run.join("var").join("ledger.db");
    let before = procs::cpu_snap(pid);
    let started = std::time::Instant::now();
    let backlog = keybroker::wallet::mailer::outbox_pending(&db).unwrap_or(0);
    let mut left = usize::MAX;
    while started.elapsed() < Duration::from_secs(120) {
        left = keybroker::wallet::mailer::outbox_pending(&db).unwrap_or(usize::MAX);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = procs::cpu_delta(&before, &procs::cpu_snap(pid));
    let per_op = cpu.group("mailer") / backlog.saturating_sub(left).max(1) as f64 * 1e6;
    e.extra.insert(
        "mail_drain_s".into(),
        json!(started.elapsed().as_secs_f64()),
    );
    e.extra.insert("mail_left".into(), json!(left));
    e.extra.insert("mail_backlog".into(), json!(backlog));
    e.extra
        .insert("mail_drain_cpu_us_per_mail".into(), json!(per_op));
    e.notes.push(format!(
        "then the mail backlog of {backlog}: {:.1} s to drain, {per_op:.1} µs of mailer CPU per mail (one per purchase; not in cpu µs/op); {left} left",
        started.elapsed().as_secs_f64()
    ));
}

pub(crate) fn mixed(ctx: &mut Ctx) -> Result<()> {
    let (addr, pid) = ctx.broker("software")?;
    let terms = ctx.env.terminals.clone();
    let n = workers(ctx, 32, terms.len());
    let counts = Arc::new(ops::MixCounts::default());
    let c = counts.clone();
    let mut ops = build_ops(n, |i| {
        let t = terms[i % terms.len()].clone();
        Ok(Box::new(ops::Mixed {
            session: ops::Session::new(addr, t.clone())?,
            resume: ops::Resume::new(addr, t)?,
            counts: c.clone(),
        }) as Box<dyn Op>)
    })?;
    // 10% resumes need one password check each; stay well inside both the
    // exchange peak and the password-check capacity.
    let default_rate = {
        let by_auth = 0.4 * ctx.argon2_capacity() / 0.1;
        let by_peak = 0.5 * ctx.sw_peak.unwrap_or(400.0);
        by_auth.min(by_peak).max(1.0)
    };
    let rate = ctx.cli.rate.unwrap_or(default_rate);
    let mut e = run_plan(ctx, "mixed", pid, &mut ops, 0.0, rate)?;
    let (f, p, r) = (
        counts.full.load(Ordering::Relaxed) as f64,
        counts.partial.load(Ordering::Relaxed) as f64,
        counts.resume.load(Ordering::Relaxed) as f64,
    );
    let total = (f + p + r).max(1.0);
    e.floor_us = (f * ctx.floor_us("exchange_software")
        + p * ctx.floor_us("exchange_partial")
        + r * ctx.floor_us("resume"))
        / total;
    e.extra.insert(
        "mix".into(),
        json!({"full_exchange": f, "partial_exchange": p, "resume_login": r}),
    );
    e.notes.push(
        "op = 60% full exchange + direct request, 30% partial exchange + direct request, 10% resume + login; floor weighted by the ops done".into(),
    );
    e.notes
        .push("broker_cpu_s excludes the auth-* threads (argon2id of the resumes)".into());
    ctx.entries.push(e);
    Ok(())
}

pub(crate) fn idle(ctx: &mut Ctx) -> Result<()> {
    // A fresh broker: memory freed by earlier scenarios would hide growth.
    ctx.broker = None;
    let (addr, pid) = ctx.broker("software")?;
    let n = ctx
        .cli
        .idle_conns
        .unwrap_or(if ctx.cli.quick { 500 } else { 10_000 });
    let terms = ctx.env.terminals.clone();
    let configs: Vec<_> = terms.iter().map(|t| ops::no_resume(&t.config)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = procs::rss_bytes(pid);
    let cpu0 = procs::cpu_snap(pid);
    let pb = ProgressBar::new(n as u64).with_style(style(false));
    pb.set_prefix(format!("idle x{n}"));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(300);
    let threads = 4;
    let results: Vec<(
        Vec<keybroker::terminal::Terminal>,
        hdrhistogram::Histogram<u64>,
        u64,
    )> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|k| {
                let (configs, pb) = (&configs, pb.clone());
                s.spawn(move || {
                    let mut held = Vec::new();
                    let mut h = load::new_hist();
                    let mut errors = 0;
                    for i in (k..n).step_by(threads) {
                        if Instant::now() > deadline {
                            errors += 1;
                            continue;
                        }
                        let t0 = Instant::now();
                        match keybroker::terminal::Terminal::connect(
                            addr,
                            &configs[i % configs.len()],
                            ops::TIMEOUT,
                        ) {
                            Ok(t) => {
                                h.saturating_record((t0.elapsed().as_micros() as u64).max(1));
                                held.push(t);
                            }
                            Err(_) => errors += 1,
                        }
                        pb.inc(1);
                    }
                    (held, h, errors)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("idle thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    pb.finish_and_clear();
    let cpu1 = procs::cpu_snap(pid);
    std::thread::sleep(Duration::from_secs(1));
    let rss1 = procs::rss_bytes(pid);
    let mut hist = load::new_hist();
    let mut held = 0usize;
    let mut errors = 0;
    let mut all = Vec::new();
    for (t, h, e) in results {
        held += t.len();
        hist.add(&h).expect("bounds");
        errors += e;
        all.push(t);
    }
    // A held connection still answers.
    if let Some(t) = all.iter_mut().flat_map(|v| v.iter_mut()).next() {
        t.ping()
            .context("a held idle connection no longer answers")?;
    }
    let per_conn = rss1.saturating_sub(rss0) as f64 / held.max(1) as f64;
    let cpu = procs::cpu_delta(&cpu0, &cpu1);
    let r = RunResult {
        hist,
        ok: held as u64,
        errors,
        missed: 0,
        elapsed,
        error_samples: Vec::new(),
        workers: threads,
    };
    let plan = Plan::Closed {
        secs: elapsed.as_secs_f64(),
    };
    let cpu = Cpu {
        broker: cpu,
        market: procs::CpuDelta::default(),
        ledger_s: None,
        bench_s: None,
        machine: None,
    };
    let mut e = entry(
        "idle",
        &plan,
        r,
        &cpu,
        ctx.item_us("tls13_full_handshake_client_auth_server_side"),
    );
    e.extra.insert("connections".into(), json!(held));
    e.extra.insert("rss_before_bytes".into(), json!(rss0));
    e.extra.insert("rss_after_bytes".into(), json!(rss1));
    e.extra
        .insert("rss_bytes_per_connection".into(), json!(per_conn));
    e.extra
        .insert("rss_target_bytes_per_connection".into(), json!(65536));
    e.notes.push(format!(
        "{held} concurrent idle terminal connections (completed full handshakes, held open); broker VmRSS {:.1} MiB -> {:.1} MiB = {per_conn:.0} bytes per connection; ops/latency are the handshakes",
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0
    ));
    eprintln!("  idle: {held} connections, {per_conn:.0} bytes of broker RSS each");
    ctx.entries.push(e);
    drop(all);
    Ok(())
}
