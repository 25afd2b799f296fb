//! Results: one entry per scenario, the text table, the JSON report and the
//! latency chart.

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use std::path::Path;

/// `cpu_s` CPU-seconds spread over `ops` operations, in µs per operation.
pub fn us_per_op(cpu_s: f64, ops: u64) -> f64 {
    cpu_s * 1e6 / (ops.max(1) as f64)
}

pub struct Entry {
    pub name: String,
    pub mode: String,
    pub workers: usize,
    pub target_rate: Option<f64>,
    pub ops: u64,
    pub ops_per_s: f64,
    /// Broker CPU counted against the scenario (all threads but `auth-*`).
    pub broker_cpu_s: f64,
    /// argon2id password checks (`auth-*` threads).
    pub auth_cpu_s: f64,
    pub broker_cpu_total_s: f64,
    pub broker_cpu_stat_s: f64,
    pub broker_cpu_by_thread: Value,
    pub market_cpu_s: f64,
    pub floor_us: f64,
    pub errors: u64,
    pub missed: u64,
    pub hist: Histogram<u64>,
    pub notes: Vec<String>,
    pub extra: Map<String, Value>,
}

impl Entry {
    pub fn cpu_us_per_op(&self) -> f64 {
        us_per_op(self.broker_cpu_s, self.ops)
    }
    pub fn ops_per_broker_cpu_s(&self) -> f64 {
        self.ops as f64 / self.broker_cpu_s.max(1e-9)
    }
    pub fn floor_ratio(&self) -> f64 {
        if self.floor_us > 0.0 {
            self.cpu_us_per_op() / self.floor_us
        } else {
            0.0
        }
    }
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn json(&self) -> Value {
        let mut m = json!({
            "mode": self.mode,
            "workers": self.workers,
            "target_rate": self.target_rate,
            "ops": self.ops,
            "ops_per_s": self.ops_per_s,
            "broker_cpu_s": self.broker_cpu_s,
            "broker_cpu_us_per_op": self.cpu_us_per_op(),
            "ops_per_broker_cpu_s": self.ops_per_broker_cpu_s(),
            "floor_cpu_us_per_op": self.floor_us,
            "floor_ops_per_cpu_s": if self.floor_us > 0.0 { 1e6 / self.floor_us } else { 0.0 },
            "floor_ratio": self.floor_ratio(),
            "p50_ms": self.ms(0.5),
            "p90_ms": self.ms(0.9),
            "p99_ms": self.ms(0.99),
            "p999_ms": self.ms(0.999),
            "max_ms": self.hist.max() as f64 / 1000.0,
            "errors": self.errors,
            "missed": self.missed,
            "password_check_cpu_s": self.auth_cpu_s,
            "password_check_cpu_ms_per_op": us_per_op(self.auth_cpu_s, self.ops) / 1e3,
            "broker_cpu_total_s": self.broker_cpu_total_s,
            "broker_cpu_stat_s": self.broker_cpu_stat_s,
            "broker_cpu_by_thread_s": self.broker_cpu_by_thread,
            "market_cpu_s": self.market_cpu_s,
            "market_cpu_us_per_op": us_per_op(self.market_cpu_s, self.ops),
            "notes": self.notes,
        });
        let obj = m.as_object_mut().expect("object");
        for (k, v) in &self.extra {
            obj.insert(k.clone(), v.clone());
        }
        m
    }
}

/// The results table; its first line names the ledger the brokers used.
pub fn table(ledger: &str, entries: &[Entry], unavailable: &[(&str, &str)]) -> String {
    let mut s = format!("ledger: {ledger}\n");
    s += &format!(
        "{:<28} {:>6} {:>4} {:>9} {:>11} {:>13} {:>11} {:>7} {:>8} {:>8} {:>8} {:>6}\n",
        "scenario",
        "mode",
        "wrk",
        "ops/s",
        "cpu µs/op",
        "ops/brk-cpu-s",
        "floor op/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors"
    );
    for e in entries {
        s += &format!(
            "{:<28} {:>6} {:>4} {:>9.0} {:>11.1} {:>13.0} {:>11.0} {:>7.2} {:>8.2} {:>8.2} {:>8.1} {:>6}\n",
            e.name,
            e.mode,
            e.workers,
            e.ops_per_s,
            e.cpu_us_per_op(),
            e.ops_per_broker_cpu_s(),
            if e.floor_us > 0.0 {
                1e6 / e.floor_us
            } else {
                0.0
            },
            e.floor_ratio(),
            e.ms(0.5),
            e.ms(0.99),
            e.hist.max() as f64 / 1000.0,
            e.errors
        );
        if e.auth_cpu_s > 0.0 {
            s += &format!(
                "{:<28}   + password checks (argon2id, auth-* threads, not in cpu µs/op): {:.2} ms CPU per op\n",
                "",
                us_per_op(e.auth_cpu_s, e.ops) / 1e3
            );
        }
        let x = |k: &str| e.extra.get(k).and_then(Value::as_f64);
        if let (Some(busy), Some(all), Some(bench)) = (
            x("machine_busy_pct"),
            x("machine_cpu_us_per_op"),
            x("bench_cpu_us_per_op"),
        ) {
            s += &format!(
                "{:<28}   + machine {busy:.0}% busy, {all:.0} µs CPU per op: market {:.0}, terminals and harness {bench:.0}\n",
                "",
                us_per_op(e.market_cpu_s, e.ops)
            );
        }
        if let (Some(us), Some(per_s), Some(ratio)) = (
            x("floor_with_transport_cpu_us_per_op"),
            x("floor_with_transport_ops_per_cpu_s"),
            x("floor_with_transport_ratio"),
        ) {
            s += &format!(
                "{:<28}   + floor with loopback TCP {us:.1} µs ({per_s:.0} ops/cpu-s): ratio {ratio:.2}\n",
                ""
            );
        }
        if let Some(us) = e
            .extra
            .get("ledger_server_cpu_us_per_op")
            .and_then(Value::as_f64)
        {
            s += &format!(
                "{:<28}   + PostgreSQL server (its own processes, not in cpu µs/op): {us:.1} µs CPU per op\n",
                ""
            );
        }
    }
    for (n, why) in unavailable {
        s += &format!("{n:<28} {why}\n");
    }
    s
}

/// Latency percentile curves per scenario: x is the percentile on a
/// "nines" scale (90, 99, 99.9, 99.99), y the latency in ms on a log axis.
/// The SLO (`slo_ms` at p99) is a dashed cross: a curve passing under its
/// corner meets it. The legend sits right of the plot, never over a curve.
pub fn chart(entries: &[Entry], path: &Path, slo_ms: f64) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let curves: Vec<(&str, Vec<(f64, f64)>)> = entries
        .iter()
        .filter(|e| !e.hist.is_empty())
        .map(|e| {
            let pts = (0..=80)
                .map(|i| {
                    let x = i as f64 * 0.05;
                    let q = 1.0 - 10f64.powf(-x);
                    (x, (e.hist.value_at_quantile(q) as f64 / 1000.0).max(0.001))
                })
                .collect();
            (e.name.as_str(), pts)
        })
        .collect();
    let ymax = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.1))
        .fold(slo_ms, f64::max)
        * 2.0;
    let ymin = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.1))
        .fold(ymax, f64::min)
        .max(0.001)
        / 2.0;
    let root = SVGBackend::new(path, (1350, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    // The legend's own column: plotters draws series labels inside the
    // plot, where with a dozen curves they hid the tails that matter.
    let (plot, legend) = root.split_horizontally(1100);
    let mut c = ChartBuilder::on(&plot)
        .caption(
            "keybroker latency by percentile (open loop: from intended send time)",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..4f64, (ymin..ymax).log_scale())?;
    c.configure_mesh()
        .x_desc("percentile")
        .y_desc("latency, ms (log)")
        .x_labels(9)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-*x));
            format!("{p:.2}%")
        })
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    let p99 = 2.0; // 1 - 10^-2 on the nines scale
    let slo = RED.mix(0.8).stroke_width(2);
    c.draw_series(DashedLineSeries::new(
        [(0.0, slo_ms), (4.0, slo_ms)],
        8,
        5,
        slo,
    ))?;
    c.draw_series(DashedLineSeries::new([(p99, ymin), (p99, ymax)], 8, 5, slo))?;
    let row = |i: usize| 40 + 22 * i as i32;
    let text = ("sans-serif", 15).into_font();
    let mut labels = vec![(format!("SLO: p99 ≤ {slo_ms} ms"), RED.mix(0.8))];
    for (i, (name, pts)) in curves.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(pts, color.stroke_width(2)))?;
        labels.push((name.to_owned(), color));
    }
    for (i, (name, color)) in labels.into_iter().enumerate() {
        let y = row(i);
        legend.draw(&PathElement::new(
            vec![(10, y), (34, y)],
            color.stroke_width(2),
        ))?;
        legend.draw(&Text::new(name, (42, y - 8), text.clone()))?;
    }
    root.present()?;
    Ok(())
}
