//! Prometheus metrics. Names end in their unit.
//!
//! Worker pools and the admin thread record here directly; core threads keep
//! plain per-core counters that are merged at scrape time (see broker::stats).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use std::sync::LazyLock;
use std::time::Duration;

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("metric registers once");
    c
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

static POOL_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "keybroker_pool_queue_wait_seconds",
                "Time a job waited in a worker pool's queue before a worker took it",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["pool"],
        )
        .expect("valid metric"),
    )
});

static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "keybroker_errors_total",
                "Typed errors sent to terminals, by code",
            ),
            &["code"],
        )
        .expect("valid metric"),
    )
});

static REFUSED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    register(
        prometheus::IntCounter::new(
            "keybroker_connections_refused_total",
            "Connections closed at accept because a core was at its connection limit",
        )
        .expect("valid metric"),
    )
});

pub fn refused_connection() {
    REFUSED.inc();
}

static MARKET_BATCH: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    register(
        prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "keybroker_market_batch_size",
                "Exchanges per market-channel batch",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        )
        .expect("valid metric"),
    )
});

static MARKET_RTT: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    register(
        prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "keybroker_market_round_trip_seconds",
                "Time from sending a batch to the market until its last reply",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric"),
    )
});

static EXCHANGE: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "keybroker_exchange_duration_seconds",
                "End-to-end brokered exchange latency inside the broker, by key-exchange mode",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["kx"],
        )
        .expect("valid metric"),
    )
});

pub fn exchange_done(kx: &str, d: Duration) {
    EXCHANGE.with_label_values(&[kx]).observe(d.as_secs_f64());
}

pub fn market_batch(n: usize) {
    MARKET_BATCH.observe(n as f64);
}

pub fn market_round_trip(d: Duration) {
    MARKET_RTT.observe(d.as_secs_f64());
}

pub fn pool_wait(pool: &str, d: Duration) {
    POOL_WAIT
        .with_label_values(&[pool])
        .observe(d.as_secs_f64());
}

pub fn error(code: crate::proto::ErrorCode) {
    ERRORS.with_label_values(&[code.name()]).inc();
}

/// The text exposition of every registered metric.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&REGISTRY.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}
