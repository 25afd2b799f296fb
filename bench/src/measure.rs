//! Measuring a run: the broker's (and market's, and PostgreSQL's) CPU
//! around it, one report entry per run beside its crypto floor, and the
//! closed-loop peak search.

use super::*;

pub(crate) enum Plan {
    Open { rate: f64, secs: f64 },
    Closed { secs: f64 },
}

/// CPU measured around a run: broker, market, and the PostgreSQL server
/// when the bench runs it.
pub(crate) struct Cpu {
    pub(crate) broker: procs::CpuDelta,
    pub(crate) market: procs::CpuDelta,
    pub(crate) ledger_s: Option<f64>,
    /// The bench process: its terminals and the harness (process total,
    /// so threads that ended during the run count).
    pub(crate) bench_s: Option<f64>,
    /// Busy CPU-seconds of the whole machine, and its busy share.
    pub(crate) machine: Option<(f64, f64)>,
}

/// Runs `ops` under `plan` and measures the broker and market CPU around it.
pub(crate) fn measured(
    ctx: &Ctx,
    name: &str,
    pid: u32,
    ops: &mut [Box<dyn Op>],
    plan: &Plan,
) -> (RunResult, Cpu) {
    let mpid = ctx.env.market_pid().unwrap_or(0);
    let (pb, label) = match plan {
        Plan::Open { rate, secs } => (
            ProgressBar::new((rate * secs).ceil() as u64).with_style(style(false)),
            format!("{name} @{rate:.0}/s"),
        ),
        Plan::Closed { .. } => (
            ProgressBar::new_spinner().with_style(style(true)),
            format!("{name} w={}", ops.len()),
        ),
    };
    pb.set_prefix(label);
    // Taken once the workers have warmed up, right before the timed run.
    let before = std::sync::OnceLock::new();
    let at_start = || {
        before.get_or_init(|| {
            (
                procs::cpu_snap(pid),
                procs::cpu_snap(mpid),
                ctx.ledger_pid.map(procs::tree_snap),
                procs::stat_ticks(std::process::id()),
                procs::machine_snap(),
            )
        });
    };
    let r = match plan {
        Plan::Open { rate, secs } => load::open_loop(
            ops,
            *rate,
            Duration::from_secs_f64(*secs),
            (rate * secs).ceil() as u64,
            &pb,
            &at_start,
        ),
        Plan::Closed { secs } => {
            pb.enable_steady_tick(Duration::from_millis(200));
            load::closed_loop(
                ops,
                Duration::from_secs_f64(*secs),
                5_000_000,
                &pb,
                &at_start,
            )
        }
    };
    let (b0, m0, l0, s0, k0) = before.into_inner().expect("set before the run");
    let (b1, m1) = (procs::cpu_snap(pid), procs::cpu_snap(mpid));
    let (s1, k1) = (procs::stat_ticks(std::process::id()), procs::machine_snap());
    let ledger_s = l0
        .zip(ctx.ledger_pid)
        .map(|(l0, lp)| procs::tree_delta_s(&l0, &procs::tree_snap(lp)));
    pb.finish_and_clear();
    for s in &r.error_samples {
        eprintln!("  {name}: error sample: {s}");
    }
    let cpu = Cpu {
        broker: procs::cpu_delta(&b0, &b1),
        market: procs::cpu_delta(&m0, &m1),
        ledger_s,
        bench_s: Some(procs::ticks_s(s0, s1)),
        machine: Some(procs::machine_delta(&k0, &k1)),
    };
    (r, cpu)
}

pub(crate) fn entry(name: &str, plan: &Plan, r: RunResult, c: &Cpu, floor_us: f64) -> Entry {
    let (cpu, mcpu) = (&c.broker, &c.market);
    let auth = cpu.group("auth");
    let (mode, target) = match plan {
        Plan::Open { rate, .. } => ("open", Some(*rate)),
        Plan::Closed { .. } => ("closed", None),
    };
    let mut extra = Map::new();
    let per_op = |s: f64| report::us_per_op(s, r.ok);
    if let (Some(bench), Some((busy, share))) = (c.bench_s, c.machine) {
        extra.insert("bench_cpu_s".into(), json!(bench));
        extra.insert("bench_cpu_us_per_op".into(), json!(per_op(bench)));
        extra.insert("machine_busy_cpu_s".into(), json!(busy));
        extra.insert("machine_cpu_us_per_op".into(), json!(per_op(busy)));
        extra.insert("machine_busy_pct".into(), json!(share * 100.0));
    }
    if let Some(s) = c.ledger_s {
        extra.insert("ledger_server_cpu_s".into(), json!(s));
        extra.insert("ledger_server_cpu_us_per_op".into(), json!(per_op(s)));
    }
    Entry {
        name: name.to_owned(),
        mode: mode.to_owned(),
        workers: r.workers,
        target_rate: target,
        ops: r.ok,
        ops_per_s: r.ops_per_s(),
        broker_cpu_s: cpu.total_s - auth,
        auth_cpu_s: auth,
        broker_cpu_total_s: cpu.total_s,
        broker_cpu_stat_s: cpu.stat_s,
        broker_cpu_by_thread: json!(cpu.groups),
        market_cpu_s: mcpu.total_s,
        floor_us,
        errors: r.errors,
        missed: r.missed,
        hist: r.hist,
        notes: r.error_samples,
        extra,
    }
}

/// Builds `n` operations (in parallel: sessions need a release each).
pub(crate) fn build_ops(
    n: usize,
    make: impl Fn(usize) -> Result<Box<dyn Op>, String> + Sync,
) -> Result<Vec<Box<dyn Op>>> {
    let make = &make;
    let per = n.div_ceil(8).max(1);
    let chunks: Vec<Result<Vec<Box<dyn Op>>, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| s.spawn(move || (start..(start + per).min(n)).map(make).collect()))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for c in chunks {
        out.extend(c.map_err(|e| anyhow::anyhow!("setting up sessions: {e}"))?);
    }
    Ok(out)
}

/// Worker counts of the closed-loop peak search (those up to the number of
/// sessions a scenario built).
pub(crate) const PEAK_STEPS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Closed loop with a growing number of workers; returns the best step.
pub(crate) fn peak(
    ctx: &Ctx,
    name: &str,
    pid: u32,
    ops: &mut [Box<dyn Op>],
    floor_us: f64,
) -> Result<Entry> {
    let secs = ctx.step_secs();
    let steps: Vec<usize> = match ctx.cli.workers {
        Some(w) => vec![w.min(ops.len())],
        None => PEAK_STEPS.into_iter().filter(|w| *w <= ops.len()).collect(),
    };
    let mut best: Option<Entry> = None;
    let mut flat = 0;
    let mut curve = Vec::new();
    for w in steps {
        let plan = Plan::Closed { secs };
        let (r, cpu) = measured(ctx, name, pid, &mut ops[..w], &plan);
        let e = entry(name, &plan, r, &cpu, floor_us);
        eprintln!(
            "  {name} closed w={w}: {:.0} ops/s, {:.1} µs broker CPU/op, {} errors",
            e.ops_per_s,
            e.cpu_us_per_op(),
            e.errors
        );
        curve.push(json!({"workers": w, "ops_per_s": e.ops_per_s, "broker_cpu_us_per_op": e.cpu_us_per_op()}));
        let better = best.as_ref().is_none_or(|b| e.ops_per_s > b.ops_per_s);
        let grew = best
            .as_ref()
            .is_none_or(|b| e.ops_per_s > b.ops_per_s * 1.05);
        if better {
            best = Some(e);
        }
        flat = if grew { 0 } else { flat + 1 };
        if flat >= 3 {
            break;
        }
    }
    let mut best = best.context("no closed-loop step ran")?;
    best.extra.insert("peak_search".into(), json!(curve));
    best.notes
        .push("closed loop: the step with the highest throughput".into());
    Ok(best)
}
