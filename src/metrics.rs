//! Prometheus metrics. Names end in their unit.
//!
//! ```text
//! core thread ─► its own CoreMetrics registry (no other thread writes it)
//! pools, links, admin ─► the shared REGISTRY
//! scrape ─► render(): shared families + per-core families merged by name and labels
//! ```
//!
//! Core threads never contend on a metric: each core records into its own
//! registry, and the scrape sums them. Gauges that are per core by nature
//! (connections, work in flight) keep a `core` label instead.

use prometheus::core::Collector;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// Metrics written from any thread (pools, links, admin).
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];

fn shared<C: Collector + Clone + 'static>(c: C) -> C {
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("metric registers once");
    c
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid metric")
}

fn histogram_vec(name: &str, help: &str, label: &str) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        &[label],
    )
    .expect("valid metric")
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
}

/// Why the broker refused a terminal's TLS handshake: the `reason` label
/// of `keybroker_handshake_refused_total` (docs/OPERATIONS.md, "Limits").
pub const HANDSHAKE_REFUSALS: [&str; 9] = [
    // No client certificate (alert certificate_required, 116).
    "no_certificate",
    // A certificate from another CA, or self-signed (unknown_ca, 48).
    "unknown_ca",
    // Any other certificate fault: expired, wrong usage, bad signature.
    "bad_certificate",
    // Not TLS 1.3, no common cipher or group, malformed messages.
    "protocol",
    // Not done within handshake_timeout_ms.
    "timeout",
    // The peer closed or reset the connection before finishing.
    "closed",
    // No valid PROXY v2 header (with broker.proxy_protocol).
    "proxy_header",
    // The source has max_pending_per_source handshakes open already.
    "source_pending",
    // The source opened connections faster than handshakes_per_source_per_s.
    "source_rate",
];

/// The `result` labels of an offered ticket (`broker::tickets::Verdict`).
pub const TICKET_VERDICTS: [&str; 5] = ["accepted", "reused", "expired", "forgotten", "invalid"];

/// What one core thread records. Only that core writes it.
pub struct CoreMetrics {
    registry: Registry,
    exchange: HistogramVec,
    handshake: Histogram,
    handshake_refused: IntCounterVec,
    errors: IntCounterVec,
    tickets: IntCounterVec,
    pub connections: IntGauge,
    pub inflight: IntGauge,
}

impl CoreMetrics {
    fn new(core: &str) -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn Collector>| registry.register(c).expect("metric registers once");
        let exchange = histogram_vec(
            "keybroker_exchange_duration_seconds",
            "End-to-end brokered exchange latency inside the broker, by key-exchange mode",
            "kx",
        );
        let handshake = histogram(
            "keybroker_handshake_duration_seconds",
            "Terminal TLS handshake time on the access channel",
        );
        let handshake_refused = counter_vec(
            "keybroker_handshake_refused_total",
            "Terminal connections refused before or during the TLS handshake, by reason",
            "reason",
        );
        let errors = counter_vec(
            "keybroker_errors_total",
            "Typed errors sent to terminals, by code",
            "code",
        );
        let tickets = counter_vec(
            "keybroker_session_tickets_total",
            "TLS session tickets issued, and those offered by result (broker/tickets.rs)",
            "result",
        );
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(Opts::new(name, help).const_label("core", core))
                .expect("valid metric")
        };
        let connections = gauge(
            "keybroker_connections",
            "Open terminal connections on this core",
        );
        let inflight = gauge(
            "keybroker_inflight",
            "Requests on this core waiting for the HSM, the auth pool or a market",
        );
        // Every series exists from the start, so queries and alerts see 0
        // rather than nothing.
        for code in crate::proto::ErrorCode::ALL {
            errors.with_label_values(&[code.name()]);
        }
        tickets.with_label_values(&["issued"]);
        for v in TICKET_VERDICTS {
            tickets.with_label_values(&[v]);
        }
        for kx in ["software", "hsm", "partial"] {
            exchange.with_label_values(&[kx]);
        }
        for reason in HANDSHAKE_REFUSALS {
            handshake_refused.with_label_values(&[reason]);
        }
        reg(Box::new(exchange.clone()));
        reg(Box::new(handshake.clone()));
        reg(Box::new(handshake_refused.clone()));
        reg(Box::new(errors.clone()));
        reg(Box::new(tickets.clone()));
        reg(Box::new(connections.clone()));
        reg(Box::new(inflight.clone()));
        Self {
            registry,
            exchange,
            handshake,
            handshake_refused,
            errors,
            tickets,
            connections,
            inflight,
        }
    }
}

static CORES: LazyLock<Mutex<Vec<Arc<CoreMetrics>>>> = LazyLock::new(|| {
    // Threads that are not cores (demo, tests) record here.
    Mutex::new(vec![Arc::new(CoreMetrics::new("other"))])
});

thread_local! {
    static LOCAL: RefCell<Option<Arc<CoreMetrics>>> = const { RefCell::new(None) };
}

/// Gives the calling core thread its own metrics; returns them.
pub fn attach_core(index: usize) -> Arc<CoreMetrics> {
    let m = Arc::new(CoreMetrics::new(&index.to_string()));
    CORES.lock().expect("cores").push(m.clone());
    LOCAL.with(|l| *l.borrow_mut() = Some(m.clone()));
    m
}

fn local<R>(f: impl FnOnce(&CoreMetrics) -> R) -> R {
    LOCAL.with(|l| match &*l.borrow() {
        Some(m) => f(m),
        None => f(&CORES.lock().expect("cores")[0]),
    })
}

pub fn exchange_done(kx: &str, d: Duration) {
    local(|m| m.exchange.with_label_values(&[kx]).observe(d.as_secs_f64()));
}

/// Work in flight on the calling core goes up or down by `delta`.
pub fn inflight(delta: i64) {
    local(|m| m.inflight.add(delta));
}

pub fn handshake_done(d: Duration) {
    local(|m| m.handshake.observe(d.as_secs_f64()));
}

/// A terminal's handshake refused, `reason` one of [`HANDSHAKE_REFUSALS`].
pub fn handshake_refused(reason: &'static str) {
    local(|m| m.handshake_refused.with_label_values(&[reason]).inc());
}

pub fn error(code: crate::proto::ErrorCode) {
    local(|m| m.errors.with_label_values(&[code.name()]).inc());
}

/// A session ticket issued, or one offered and what became of it.
pub fn ticket(result: &str) {
    local(|m| m.tickets.with_label_values(&[result]).inc());
}

static POOL_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    shared(histogram_vec(
        "keybroker_pool_queue_wait_seconds",
        "Time a job waited in a worker pool's queue before a worker took it",
        "pool",
    ))
});

static HSM_OP: LazyLock<HistogramVec> = LazyLock::new(|| {
    shared(histogram_vec(
        "keybroker_hsm_operation_duration_seconds",
        "Time the HSM took for one operation, queue wait excluded",
        "op",
    ))
});

static HSM_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    shared(
        IntCounter::new("keybroker_hsm_errors_total", "Failed HSM operations")
            .expect("valid metric"),
    )
});

static HSM_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    shared(IntGauge::new("keybroker_hsm_up", "1 when the HSM token answers").expect("valid metric"))
});

static HSM_DESTROYS_OWED: LazyLock<IntGauge> = LazyLock::new(|| {
    shared(
        IntGauge::new(
            "keybroker_hsm_destroys_owed",
            "HSM session objects whose destroy found the HSM queue full, waiting for the next HSM job",
        )
        .expect("valid metric"),
    )
});

static MARKET_BATCH: LazyLock<Histogram> = LazyLock::new(|| {
    shared(
        Histogram::with_opts(
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

static MARKET_RTT: LazyLock<Histogram> = LazyLock::new(|| {
    shared(histogram(
        "keybroker_market_round_trip_seconds",
        "Time from sending a batch to the market until its last reply",
    ))
});

static MARKET_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    shared(
        IntGaugeVec::new(
            Opts::new(
                "keybroker_market_up",
                "Cores whose market channel to this market is connected",
            ),
            &["market"],
        )
        .expect("valid metric"),
    )
});

static LOCKOUTS: LazyLock<IntCounter> = LazyLock::new(|| {
    shared(
        IntCounter::new(
            "keybroker_lockouts_total",
            "Cards locked after too many wrong passwords",
        )
        .expect("valid metric"),
    )
});

static REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    shared(
        IntCounter::new(
            "keybroker_connections_refused_total",
            "Connections closed at accept because a core was at its connection limit",
        )
        .expect("valid metric"),
    )
});

pub fn refused_connection() {
    REFUSED.inc();
}

static ACCEPT_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    shared(
        IntCounter::new(
            "keybroker_accept_failures_total",
            "Failed accept calls (EMFILE, ENFILE: out of descriptors; the loop then pauses)",
        )
        .expect("valid metric"),
    )
});

pub fn accept_failed() {
    ACCEPT_FAILURES.inc();
}

pub fn pool_wait(pool: &str, d: Duration) {
    POOL_WAIT
        .with_label_values(&[pool])
        .observe(d.as_secs_f64());
}

/// Records one HSM operation's time and outcome.
pub fn hsm_op(op: &str, d: Duration, ok: bool) {
    HSM_OP.with_label_values(&[op]).observe(d.as_secs_f64());
    if !ok {
        HSM_ERRORS.inc();
    }
}

pub fn hsm_up(up: bool) {
    HSM_UP.set(i64::from(up));
}

pub fn hsm_destroys_owed(n: usize) {
    HSM_DESTROYS_OWED.set(i64::try_from(n).unwrap_or(i64::MAX));
}

pub fn market_batch(n: usize) {
    MARKET_BATCH.observe(n as f64);
}

pub fn market_round_trip(d: Duration) {
    MARKET_RTT.observe(d.as_secs_f64());
}

pub fn market_link(market: &str, up: bool) {
    let g = MARKET_UP.with_label_values(&[market]);
    if up { g.inc() } else { g.dec() }
}

/// Registers a market so its gauge reads 0 before any core connects.
pub fn market_known(market: &str) {
    MARKET_UP.with_label_values(&[market]);
    EXCHANGE_RETRIED.with_label_values(&[market]);
}

static EXCHANGE_RETRIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    shared(counter_vec(
        "keybroker_exchange_retried_total",
        "Exchanges asked again on a new market channel after theirs broke under them",
        "market",
    ))
});

pub fn exchange_retried(market: &str) {
    EXCHANGE_RETRIED.with_label_values(&[market]).inc();
}

static LEDGER_COMMIT: LazyLock<Histogram> = LazyLock::new(|| {
    shared(histogram(
        "keybroker_ledger_commit_duration_seconds",
        "Time to apply and durably commit one ledger group",
    ))
});

static LEDGER_GROUP: LazyLock<Histogram> = LazyLock::new(|| {
    shared(
        Histogram::with_opts(
            HistogramOpts::new(
                "keybroker_ledger_group_size",
                "Ledger writes committed together",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
            ]),
        )
        .expect("valid metric"),
    )
});

static MAIL_DELIVERY: LazyLock<Histogram> = LazyLock::new(|| {
    shared(histogram(
        "keybroker_mail_delivery_duration_seconds",
        "Time to hand one notification to the relay or the Maildir",
    ))
});

static MAIL_PENDING: LazyLock<IntGauge> = LazyLock::new(|| {
    shared(
        IntGauge::new(
            "keybroker_mail_outbox_pending",
            "Notifications not yet delivered",
        )
        .expect("valid metric"),
    )
});

static MAIL_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    shared(
        IntCounter::new(
            "keybroker_mail_failures_total",
            "Failed notification delivery attempts",
        )
        .expect("valid metric"),
    )
});

/// Wallet operations by kind (purchases, cancels, topups) and result.
static WALLET_OPS: LazyLock<[IntCounterVec; 3]> = LazyLock::new(|| {
    [
        ("keybroker_purchases_total", "Purchase decisions by result"),
        ("keybroker_cancels_total", "Cancellations by result"),
        ("keybroker_topups_total", "Top-ups by result"),
    ]
    .map(|(n, h)| shared(counter_vec(n, h, "result")))
});

#[derive(Clone, Copy, Debug)]
pub enum WalletOp {
    Purchase = 0,
    Cancel = 1,
    TopUp = 2,
}

pub fn wallet_op(op: WalletOp, result: &str) {
    WALLET_OPS[op as usize].with_label_values(&[result]).inc();
}

pub fn ledger_commit(d: Duration, group: usize) {
    LEDGER_COMMIT.observe(d.as_secs_f64());
    LEDGER_GROUP.observe(group as f64);
}

pub fn mail_delivered(d: Duration) {
    MAIL_DELIVERY.observe(d.as_secs_f64());
}

pub fn mail_failed() {
    MAIL_FAILURES.inc();
}

pub fn mail_pending(n: usize) {
    MAIL_PENDING.set(n as i64);
}

const PROCESS_CPU: &str = "process_cpu_seconds_total";

/// The process_* series (resident memory, open and most descriptors,
/// threads, ...), read from /proc at each scrape so they cost nothing in
/// between. The crate's collector counts CPU in whole seconds, so a broker
/// at 5% of a core showed a rate of 0 for 20 s and then 1; its CPU series is
/// replaced by the process CPU clock, in nanoseconds.
struct Process {
    inner: prometheus::process_collector::ProcessCollector,
    cpu: prometheus::Counter,
}

impl Process {
    fn new() -> Self {
        Self {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
            cpu: prometheus::Counter::new(PROCESS_CPU, "User and system CPU time, seconds")
                .expect("valid metric"),
        }
    }
}

impl Collector for Process {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let inner = self.inner.desc().into_iter();
        inner
            .filter(|d| d.fq_name != PROCESS_CPU)
            .chain(self.cpu.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        let seconds = now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9;
        // A counter only goes up: add what the clock moved since the last
        // scrape (two scrapes at once add nothing twice).
        let delta = seconds - self.cpu.get();
        if delta > 0.0 {
            self.cpu.inc_by(delta);
        }
        let inner = self.inner.collect().into_iter();
        inner
            .filter(|f| f.name() != PROCESS_CPU)
            .chain(self.cpu.collect())
            .collect()
    }
}

/// `keybroker_build_info{version,commit}`: always 1. The commit comes from
/// build.rs (`unknown` when built outside a git checkout), so a dashboard
/// or an alert can tell which build each instance runs, and a rollout's
/// progress shows as the count by `commit`.
static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    shared(
        IntGaugeVec::new(
            Opts::new("keybroker_build_info", "The running build: always 1"),
            &["version", "commit"],
        )
        .expect("valid metric"),
    )
});

/// Creates every shared family and its known label values up front, so a
/// fresh broker already exposes each series (at zero).
pub fn init() {
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("KEYBROKER_COMMIT")])
        .set(1);
    // Once per process: a second registration of the same names fails.
    static PROCESS: std::sync::Once = std::sync::Once::new();
    PROCESS.call_once(|| {
        REGISTRY
            .register(Box::new(Process::new()))
            .expect("process collector registers once");
    });
    for op in ["sign", "keygen_sign", "derive", "unwrap"] {
        HSM_OP.with_label_values(&[op]);
    }
    for pool in ["hsm", "auth"] {
        POOL_WAIT.with_label_values(&[pool]);
    }
    for ops in WALLET_OPS.iter() {
        ops.with_label_values(&["ok"]);
    }
    LazyLock::force(&HSM_ERRORS);
    LazyLock::force(&HSM_UP);
    LazyLock::force(&HSM_DESTROYS_OWED);
    LazyLock::force(&MARKET_BATCH);
    LazyLock::force(&MARKET_RTT);
    LazyLock::force(&MARKET_UP);
    LazyLock::force(&LOCKOUTS);
    LazyLock::force(&REFUSED);
    LazyLock::force(&ACCEPT_FAILURES);
    LazyLock::force(&LEDGER_COMMIT);
    LazyLock::force(&LEDGER_GROUP);
    LazyLock::force(&MAIL_DELIVERY);
    LazyLock::force(&MAIL_PENDING);
    LazyLock::force(&MAIL_FAILURES);
}

pub fn lockout() {
    LOCKOUTS.inc();
}

fn same_labels(a: &prometheus::proto::Metric, b: &prometheus::proto::Metric) -> bool {
    let (la, lb) = (a.get_label(), b.get_label());
    la.len() == lb.len()
        && la
            .iter()
            .zip(lb)
            .all(|(x, y)| x.name() == y.name() && x.value() == y.value())
}

/// Adds `m` into `into` (same name, type and labels).
fn add(into: &mut prometheus::proto::Metric, m: &prometheus::proto::Metric, ty: MetricType) {
    match ty {
        MetricType::COUNTER => {
            let mut c = into.get_counter().clone();
            c.set_value(c.get_value() + m.get_counter().get_value());
            into.set_counter(c);
        }
        MetricType::GAUGE => {
            let mut g = into.get_gauge().clone();
            g.set_value(g.get_value() + m.get_gauge().get_value());
            into.set_gauge(g);
        }
        MetricType::HISTOGRAM => {
            let (a, b) = (into.get_histogram(), m.get_histogram());
            let mut h = a.clone();
            h.set_sample_count(a.get_sample_count() + b.get_sample_count());
            h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
            let buckets = a
                .get_bucket()
                .iter()
                .zip(b.get_bucket())
                .map(|(x, y)| {
                    let mut k = x.clone();
                    k.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                    k
                })
                .collect();
            h.set_bucket(buckets);
            into.set_histogram(h);
        }
        _ => {}
    }
}

/// Merges families with the same name, summing series with equal labels.
pub fn merge(families: impl IntoIterator<Item = MetricFamily>) -> Vec<MetricFamily> {
    let mut out: Vec<MetricFamily> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for fam in families {
        let Some(&i) = index.get(fam.name()) else {
            index.insert(fam.name().to_owned(), out.len());
            out.push(fam);
            continue;
        };
        let ty = out[i].get_field_type();
        for m in fam.get_metric() {
            let metrics = out[i].mut_metric();
            match metrics.iter_mut().find(|x| same_labels(x, m)) {
                Some(x) => add(x, m, ty),
                None => metrics.push(m.clone()),
            }
        }
    }
    out.sort_by(|a, b| a.name().cmp(b.name()));
    out
}

/// The text exposition: shared metrics plus every core's, merged.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut all = REGISTRY.gather();
    for core in CORES.lock().expect("cores").iter() {
        all.extend(core.registry.gather());
    }
    let mut out = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&merge(all), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_core_histograms_and_counters_merge_at_scrape() {
        let a = CoreMetrics::new("a");
        let b = CoreMetrics::new("b");
        a.exchange.with_label_values(&["software"]).observe(0.001);
        b.exchange.with_label_values(&["software"]).observe(0.003);
        b.exchange.with_label_values(&["hsm"]).observe(0.003);
        a.errors.with_label_values(&["busy"]).inc();
        b.errors.with_label_values(&["busy"]).inc_by(2);
        a.connections.set(3);
        b.connections.set(4);
        let merged = merge(a.registry.gather().into_iter().chain(b.registry.gather()));
        let fam = |n: &str| merged.iter().find(|f| f.name() == n).unwrap().clone();
        let ex = fam("keybroker_exchange_duration_seconds");
        assert_eq!(ex.get_metric().len(), 3); // software, hsm, partial
        let sw = ex
            .get_metric()
            .iter()
            .find(|m| m.get_label()[0].value() == "software")
            .unwrap();
        assert_eq!(sw.get_histogram().get_sample_count(), 2);
        assert!((sw.get_histogram().get_sample_sum() - 0.004).abs() < 1e-9);
        let errors = fam("keybroker_errors_total");
        let busy = errors
            .get_metric()
            .iter()
            .find(|m| m.get_label()[0].value() == "busy")
            .unwrap();
        assert_eq!(busy.get_counter().get_value(), 3.0);
        assert_eq!(
            errors.get_metric().len(),
            crate::proto::ErrorCode::ALL.len()
        );
        // Per-core gauges keep their core label.
        assert_eq!(fam("keybroker_connections").get_metric().len(), 2);
    }
}
