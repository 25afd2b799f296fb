//! Load generation: open loop at a target rate (latency from the intended
//! send time, so no coordinated omission) and closed loop (back to back).
//! Every loop is bounded in count and in time.

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use std::time::{Duration, Instant};

/// One kind of operation, driven by one worker thread.
pub trait Op: Send {
    /// Runs one operation; `Err` is counted as an error, its text sampled.
    fn run(&mut self) -> Result<(), String>;
}

pub fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 µs to 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

pub struct RunResult {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    /// Open loop: sends that were due but never started before the hard stop.
    pub missed: u64,
    pub elapsed: Duration,
    pub error_samples: Vec<String>,
    pub workers: usize,
}

impl RunResult {
    pub fn ops_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

struct WorkerOut {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    missed: u64,
    samples: Vec<String>,
}

impl WorkerOut {
    fn new() -> Self {
        Self {
            hist: new_hist(),
            ok: 0,
            errors: 0,
            missed: 0,
            samples: Vec::new(),
        }
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 120_000_000);
    h.saturating_record(us);
}

fn merge(outs: Vec<WorkerOut>, elapsed: Duration, workers: usize) -> RunResult {
    let mut r = RunResult {
        hist: new_hist(),
        ok: 0,
        errors: 0,
        missed: 0,
        elapsed,
        error_samples: Vec::new(),
        workers,
    };
    for o in outs {
        r.hist.add(&o.hist).expect("same histogram bounds");
        r.ok += o.ok;
        r.errors += o.errors;
        r.missed += o.missed;
        for s in o.samples {
            if r.error_samples.len() < 5 && !r.error_samples.contains(&s) {
                r.error_samples.push(s);
            }
        }
    }
    r
}

fn one(op: &mut dyn Op, from: Instant, out: &mut WorkerOut, pb: &ProgressBar) {
    match op.run() {
        Ok(()) => {
            record(&mut out.hist, from.elapsed());
            out.ok += 1;
        }
        Err(e) => {
            out.errors += 1;
            if out.samples.len() < 3 {
                out.samples.push(e);
            }
        }
    }
    pb.inc(1);
}

/// Called once all workers are warmed up, just before the timed run; the
/// bench takes its CPU snapshots here.
pub type AtStart<'a> = &'a (dyn Fn() + Sync);

/// One thread per op. Each thread first runs one untimed operation (a
/// session's first operation pays one-time costs: first use of a key on
/// each core's HSM session, cold caches, the first direct connection), then
/// all wait for each other, `at_start` runs once, and `work(index, op,
/// start)` runs on every thread from the same instant, which is returned
/// with the workers' results.
///
/// The workers run without transparent huge pages (`NoThp`). Each new
/// thread gets its own mimalloc pages, and mimalloc asks for huge pages:
/// every first touch zeroed a 2 MiB page. perf at the start of an open-loop
/// exchange run put 0.5 CPU-seconds of the bench in `clear_page_erms`
/// within 400 ms, which starved broker and market and made most of the
/// exchange p99 (150-270 ms at 64 workers against 10-30 ms at 16).
fn run_workers<W>(
    ops: &mut [Box<dyn Op>],
    at_start: AtStart<'_>,
    work: W,
) -> (Vec<WorkerOut>, Instant)
where
    W: Fn(usize, &mut dyn Op, Instant) -> WorkerOut + Sync,
{
    let _no_thp = NoThp::new();
    let ready = std::sync::Barrier::new(ops.len());
    let go = std::sync::Barrier::new(ops.len());
    let start = std::sync::OnceLock::new();
    let outs = std::thread::scope(|s| {
        let hs: Vec<_> = ops
            .iter_mut()
            .enumerate()
            .map(|(i, op)| {
                let (ready, go, start, work) = (&ready, &go, &start, &work);
                s.spawn(move || {
                    let _ = op.run();
                    if ready.wait().is_leader() {
                        at_start();
                        start.get_or_init(|| Instant::now() + Duration::from_millis(20));
                    }
                    go.wait();
                    work(i, op.as_mut(), *start.get().expect("set before go"))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    // With no workers nothing set it: the run starts and ends now.
    (outs, *start.get_or_init(Instant::now))
}

/// Transparent huge pages off for this process while it lives. The flag is
/// inherited by children, so it is only set while the workers run: the
/// broker, market and floor processes the bench starts keep the host's
/// setting.
struct NoThp;

impl NoThp {
    fn new() -> Self {
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            eprintln!("warning: cannot turn off transparent huge pages for the workers: {e}");
        }
        Self
    }
}

impl Drop for NoThp {
    fn drop(&mut self) {
        let _ = rustix::thread::disable_transparent_huge_pages(false);
    }
}

/// Open loop: `rate` operations per second in total, spread evenly over the
/// workers, each with its own schedule of intended send times. Stops at
/// `duration` (no new sends) or `max_ops`; a send still not started
/// `grace` after the end is counted as missed.
pub fn open_loop(
    ops: &mut [Box<dyn Op>],
    rate: f64,
    duration: Duration,
    max_ops: u64,
    pb: &ProgressBar,
    at_start: AtStart<'_>,
) -> RunResult {
    let w = ops.len().max(1);
    let interval = Duration::from_secs_f64(w as f64 / rate.max(1e-3));
    let per_worker = max_ops.div_ceil(w as u64);
    let grace = Duration::from_secs(5).max(duration / 4);
    let (outs, start) = run_workers(ops, at_start, |i, op, start| {
        let end = start + duration;
        let hard = end + grace;
        let mut out = WorkerOut::new();
        let offset = interval.mul_f64(i as f64 / w as f64);
        let mut n = 0u64;
        loop {
            let intended = start + offset + interval.mul_f64(n as f64);
            if intended >= end || n >= per_worker {
                break;
            }
            let now = Instant::now();
            if now > hard {
                // Due sends never started: counted, not timed.
                let due = (end.saturating_duration_since(intended).as_secs_f64()
                    / interval.as_secs_f64())
                .ceil() as u64;
                out.missed += due.min(per_worker - n);
                break;
            }
            if intended > now {
                std::thread::sleep(intended - now);
            }
            one(op, intended, &mut out, pb);
            n += 1;
        }
        out
    });
    let elapsed = duration.max(start.elapsed().min(duration + grace));
    merge(outs, elapsed, w)
}

/// Closed loop: each worker sends back to back for `duration` or until the
/// workers together made `max_ops`.
pub fn closed_loop(
    ops: &mut [Box<dyn Op>],
    duration: Duration,
    max_ops: u64,
    pb: &ProgressBar,
    at_start: AtStart<'_>,
) -> RunResult {
    let w = ops.len().max(1);
    let per_worker = max_ops.div_ceil(w as u64);
    let (outs, start) = run_workers(ops, at_start, |_, op, start| {
        let end = start + duration;
        let mut out = WorkerOut::new();
        let mut n = 0;
        if let Some(d) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        while n < per_worker && Instant::now() < end {
            one(op, Instant::now(), &mut out, pb);
            n += 1;
        }
        out
    });
    merge(outs, start.elapsed(), w)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sleepy(Duration);
    impl Op for Sleepy {
        fn run(&mut self) -> Result<(), String> {
            std::thread::sleep(self.0);
            Ok(())
        }
    }

    #[test]
    fn open_loop_keeps_the_rate_and_counts_queueing_delay() {
        // One worker, 100/s, but each op takes 20 ms: it falls behind, and
        // the latency from the intended time grows well past 20 ms.
        let mut ops: Vec<Box<dyn Op>> = vec![Box::new(Sleepy(Duration::from_millis(20)))];
        let r = open_loop(
            &mut ops,
            100.0,
            Duration::from_millis(500),
            1000,
            &ProgressBar::hidden(),
            &|| {},
        );
        assert!(r.ok >= 20, "ok {}", r.ok);
        assert!(r.hist.max() > 100_000, "max {} µs", r.hist.max());
    }

    #[test]
    fn closed_loop_is_bounded_by_count() {
        let mut ops: Vec<Box<dyn Op>> = vec![
            Box::new(Sleepy(Duration::from_millis(1))),
            Box::new(Sleepy(Duration::from_millis(1))),
        ];
        let r = closed_loop(
            &mut ops,
            Duration::from_secs(10),
            10,
            &ProgressBar::hidden(),
            &|| {},
        );
        assert_eq!(r.ok, 10);
    }

    #[test]
    fn no_workers_is_an_empty_run() {
        let r = closed_loop(
            &mut [],
            Duration::from_secs(1),
            10,
            &ProgressBar::hidden(),
            &|| {},
        );
        assert_eq!((r.ok, r.errors), (0, 0));
    }
}
