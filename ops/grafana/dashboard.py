#!/usr/bin/env python3
"""The keybroker Grafana dashboard, built as code with Grafana's own
foundation SDK (`pip install grafana-foundation-sdk`).

    python3 ops/grafana/dashboard.py            # rewrite dashboards/keybroker.json
    python3 ops/grafana/dashboard.py --check    # exit 1 if it is stale or off-schema

Why code and not hand-edited JSON: Grafana has no package here to load the
JSON into, and it drops or rejects what its schema does not know without a
word. The SDK's builders only offer fields of that schema, and `--check`
also reads the committed JSON back through the SDK's models: a key the
schema does not have disappears on that round trip, and the check names it.
tests/observability.rs runs `--check`, so a bad field fails a test.

Every query is scoped to one broker by the `job` and `instance` variables
(`scoped()` adds the matchers), so two brokers' series never mix.
"""

import json
import os
import re
import sys

from grafana_foundation_sdk.builders import common as viz
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog import plugins as cogplugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
    VisibilityMode,
)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards", "keybroker.json")

DS = model.DataSourceRef(type_val="prometheus", uid="${DS_PROMETHEUS}")
SCOPE = 'job="$job", instance="$instance"'
METRIC = re.compile(r"\b((?:keybroker|process)_[a-z_]+)(\{)?")


def scoped(expr):
    """`expr` with every selector limited to the chosen job and instance."""
    return METRIC.sub(
        lambda m: m.group(1) + "{" + SCOPE + (", " if m.group(2) else "}"), expr
    )


def query(ref, legend, expr):
    return (
        prometheus.Dataquery()
        .datasource(DS)
        .ref_id(ref)
        .legend_format(legend)
        .expr(scoped(expr))
        .range()
        .editor_mode("code")
    )


def right_axis(name_regex, unit):
    """A series (by display name) on the right axis, in its own unit."""
    return model.DashboardFieldConfigSourceOverrides(
        matcher=model.MatcherConfig(id_val="byRegexp", options=name_regex),
        properties=[
            model.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
            model.DynamicConfigValue(id_val="unit", value=unit),
        ],
    )


def graph(title, description, unit, width, targets, overrides=()):
    p = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(width)
        .height(8)
        .draw_style(GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(10)
        .show_points(VisibilityMode.NEVER)
        .span_nulls(False)
        .legend(
            viz.VizLegendOptions()
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
            .calcs(["mean", "max", "lastNotNull"])
            .show_legend(True)
        )
        .tooltip(
            viz.VizTooltipOptions()
            .mode(TooltipDisplayMode.MULTI)
            .sort(SortOrder.DESCENDING)
        )
    )
    for ref, (legend, expr) in zip("ABCDEFGH", targets):
        p = p.with_target(query(ref, legend, expr))
    for o in overrides:
        p = p.with_override(o.matcher, o.properties)
    return p


def up_down(title, description, width, legend, expr, repeat=None):
    """A stat that reads "up" on green or "down" on red."""
    p = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit("none")
        .span(width)
        .height(6)
        .min(0)
        .mappings(
            [
                model.ValueMap(
                    options={
                        "0": model.ValueMappingResult(text="down", color="red", index=0)
                    }
                ),
                model.RangeMap(
                    options=model.DashboardRangeMapOptions(
                        from_val=1,
                        to=1e9,
                        result=model.ValueMappingResult(text="up", color="green", index=1),
                    )
                ),
            ]
        )
        .thresholds(
            dash.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    model.Threshold(color="red", value=None),
                    model.Threshold(color="green", value=1),
                ]
            )
        )
        .color_scheme(dash.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.NONE)
        .text_mode(BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(
            viz.ReduceDataOptions()
            .calcs(["lastNotNull"])
            .values(False)
        )
        .with_target(query("A", legend, expr))
    )
    if repeat:
        p = p.repeat(repeat).repeat_direction("h")
    return p


def variable(name, label, definition, multi=False):
    v = (
        dash.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(definition)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    return v.multi(True).include_all(True) if multi else v


def build():
    d = (
        dash.Dashboard("keybroker")
        .uid("keybroker")
        .tags(["keybroker"])
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("10s")
        .time("now-1h", "now")
        .with_variable(
            dash.DatasourceVariable("DS_PROMETHEUS").label("Data source").type("prometheus")
        )
        .with_variable(variable("job", "Job", "label_values(keybroker_build_info, job)"))
        .with_variable(
            variable(
                "instance",
                "Instance",
                'label_values(keybroker_build_info{job="$job"}, instance)',
            )
        )
        .with_variable(
            variable(
                "market",
                "Market",
                'label_values(keybroker_market_up{job="$job", instance="$instance"}, market)',
                multi=True,
            )
        )
    )
    # Stable ids: links to a panel (viewPanel=N) survive a regeneration.
    ids = iter(range(1, 1000))
    for title, panels in ROWS:
        d = d.with_row(dash.Row(title).id(next(ids)))
        for p in panels:
            d = d.with_panel(p.id(next(ids)))
    return d.build()


def rate(metric):
    return "rate(%s[$__rate_interval])" % metric


def quantiles(metric, by, qs):
    """histogram_quantile of `metric`'s buckets for each q in `qs`."""
    keep = ", ".join(["le"] + ([by] if by else []))
    suffix = (" {{%s}}" % by) if by else ""
    return [
        (
            "p%g%s" % (q * 100, suffix),
            "histogram_quantile(%g, sum by (%s) (%s))" % (q, keep, rate(metric + "_bucket")),
        )
        for q in qs
    ]


def mean(metric, by=None):
    grp = "sum by (%s)" % by if by else "sum"
    return "%s (%s) / %s (%s)" % (grp, rate(metric + "_sum"), grp, rate(metric + "_count"))


ROWS = [
    (
        "Exchanges",
        [
            graph(
                "Exchange throughput by kx",
                "Completed brokered exchanges per second (count of the latency histogram).",
                "reqps",
                12,
                [("{{kx}}", "sum by (kx) (%s)" % rate("keybroker_exchange_duration_seconds_count"))],
            ),
            graph(
                "Exchange latency by kx (p50 / p90 / p99)",
                "End-to-end brokered exchange latency, terminal request to wrapped key. "
                "The p99 alert fires above 2 ms.",
                "s",
                12,
                quantiles("keybroker_exchange_duration_seconds", "kx", [0.5, 0.9, 0.99]),
            ),
            graph(
                "TLS handshake latency (p50 / p99) and rate",
                "Terminal TLS 1.3 handshakes: time and handshakes per second (right axis).",
                "s",
                12,
                quantiles("keybroker_handshake_duration_seconds", None, [0.5, 0.99])
                + [("handshakes/s", "sum(%s)" % rate("keybroker_handshake_duration_seconds_count"))],
                [right_axis("handshakes/s", "reqps")],
            ),
            graph(
                "Connections and in-flight per core",
                "Open terminal connections and requests in flight per core thread; "
                "refusals at the per-core limit on the right axis.",
                "short",
                12,
                [
                    ("connections core {{core}}", "sum by (core) (keybroker_connections)"),
                    ("in-flight core {{core}}", "sum by (core) (keybroker_inflight)"),
                    ("refused/s", "sum(%s)" % rate("keybroker_connections_refused_total")),
                ],
                [right_axis("refused/s", "reqps")],
            ),
            graph(
                "Handshakes refused by reason",
                "Terminal connections refused before or during TLS, per second. Certificate "
                "reasons fire KeybrokerCertificateProbing; source_rate and source_pending "
                "mean one address opens too many.",
                "reqps",
                12,
                [("{{reason}}", "sum by (reason) (%s)" % rate("keybroker_handshake_refused_total"))],
            ),
            graph(
                "Session tickets",
                "Tickets issued, and tickets offered by what became of them: resumption "
                "saves a full handshake, so a drop in accepted shows as handshake CPU.",
                "reqps",
                12,
                [("{{result}}", "sum by (result) (%s)" % rate("keybroker_session_tickets_total"))],
            ),
        ],
    ),
    (
        "HSM",
        [
            graph(
                "HSM operation time vs queue wait (p99)",
                "Time inside the HSM per operation against time waiting for a pool worker. "
                "Wait growing while operation time is flat means the pool is too small, "
                "not the HSM too slow.",
                "s",
                12,
                [
                    (
                        "op {{op}}",
                        "histogram_quantile(0.99, sum by (le, op) (%s))"
                        % rate("keybroker_hsm_operation_duration_seconds_bucket"),
                    ),
                    (
                        "queue wait {{pool}}",
                        "histogram_quantile(0.99, sum by (le, pool) (%s))"
                        % rate("keybroker_pool_queue_wait_seconds_bucket"),
                    ),
                ],
                [
                    model.DashboardFieldConfigSourceOverrides(
                        matcher=model.MatcherConfig(id_val="byRegexp", options="queue wait.*"),
                        properties=[
                            model.DynamicConfigValue(
                                id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                            )
                        ],
                    )
                ],
            ),
            graph(
                "HSM mean operation time vs queue wait",
                "Mean of the same two histograms, and HSM operations per second by op (right axis).",
                "s",
                12,
                [
                    ("op {{op}}", mean("keybroker_hsm_operation_duration_seconds", "op")),
                    ("queue wait {{pool}}", mean("keybroker_pool_queue_wait_seconds", "pool")),
                    (
                        "{{op}} ops/s",
                        "sum by (op) (%s)" % rate("keybroker_hsm_operation_duration_seconds_count"),
                    ),
                ],
                [right_axis(".*ops/s", "ops")],
            ),
            graph(
                "HSM errors and owed destroys",
                "HSM errors per second (any sustained rate fires KeybrokerHsmErrors), and the "
                "session objects whose destroy found the HSM queue full, waiting for the next "
                "HSM job (right axis; it should fall back to 0 between bursts).",
                "reqps",
                16,
                [
                    ("errors/s", "sum(%s)" % rate("keybroker_hsm_errors_total")),
                    ("destroys owed", "max(keybroker_hsm_destroys_owed)"),
                ],
                [right_axis("destroys owed", "short")],
            ),
            up_down("HSM up", "1 when the HSM answers.", 8, "HSM", "min(keybroker_hsm_up)"),
        ],
    ),
    (
        "Markets",
        [
            graph(
                "Market round trip (p50 / p99)",
                "Batch round trip on the market channel, send to reply.",
                "s",
                12,
                quantiles("keybroker_market_round_trip_seconds", None, [0.5, 0.99]),
            ),
            graph(
                "Market batch size",
                "Exchanges per batch frame: mean and p99. Near batch_max means batches "
                "flush on size; near 1 means they flush on batch_delay_us.",
                "short",
                12,
                [("mean", mean("keybroker_market_batch_size"))]
                + [
                    (
                        "p99",
                        "histogram_quantile(0.99, sum by (le) (%s))"
                        % rate("keybroker_market_batch_size_bucket"),
                    )
                ],
            ),
            graph(
                "Exchanges asked again",
                "Exchanges whose market channel broke under them, asked once more on a new "
                "channel. A steady rate means the market closes channels the keepalive does "
                "not keep open.",
                "reqps",
                12,
                [("{{market}}", "sum by (market) (%s)" % rate("keybroker_exchange_retried_total"))],
            ),
            # One panel per market (the `market` variable): its link is what
            # an operator looks for first when exchanges there fail.
            up_down(
                "Market $market link",
                "Cores with a connected market channel to $market; down when none has. "
                "KeybrokerMarketDown fires after 30 s down.",
                4,
                "{{market}} cores",
                'max(keybroker_market_up{market="$market"})',
                repeat="market",
            ),
        ],
    ),
    (
        "Ledger, wallet and mail",
        [
            graph(
                "Ledger commit time (p50 / p99)",
                "Time for one group commit, from taking the write lock to the durable "
                "commit (SQLite or PostgreSQL).",
                "s",
                8,
                quantiles("keybroker_ledger_commit_duration_seconds", None, [0.5, 0.99]),
            ),
            graph(
                "Ledger group size",
                "Requests committed per group commit: mean and p99.",
                "short",
                8,
                [("mean", mean("keybroker_ledger_group_size"))]
                + [
                    (
                        "p99",
                        "histogram_quantile(0.99, sum by (le) (%s))"
                        % rate("keybroker_ledger_group_size_bucket"),
                    )
                ],
            ),
            graph(
                "Purchases, cancels and top-ups by result",
                "Wallet operations per second by result (ok or an error name).",
                "reqps",
                8,
                [
                    ("purchase {{result}}", "sum by (result) (%s)" % rate("keybroker_purchases_total")),
                    ("cancel {{result}}", "sum by (result) (%s)" % rate("keybroker_cancels_total")),
                    ("top-up {{result}}", "sum by (result) (%s)" % rate("keybroker_topups_total")),
                ],
            ),
            graph(
                "Mail delivery time (p50 / p99)",
                "Time to hand one notification to the relay, or to make it durable in the Maildir.",
                "s",
                12,
                quantiles("keybroker_mail_delivery_duration_seconds", None, [0.5, 0.99]),
            ),
            graph(
                "Mail outbox backlog and failures",
                "Notifications waiting in the outbox; delivery failures per second on the "
                "right axis. KeybrokerMailBacklog fires above 100 for 10 minutes.",
                "short",
                12,
                [
                    ("pending", "sum(keybroker_mail_outbox_pending)"),
                    ("failures/s", "sum(%s)" % rate("keybroker_mail_failures_total")),
                ],
                [right_axis("failures/s", "reqps")],
            ),
        ],
    ),
    (
        "Errors",
        [
            graph(
                "Typed errors by code",
                "Typed errors sent to terminals, per second, by code.",
                "reqps",
                16,
                [("{{code}}", "sum by (code) (%s)" % rate("keybroker_errors_total"))],
            ),
            graph(
                "Lockouts",
                "Home cards locked after too many wrong passwords, per hour.",
                "short",
                8,
                [("locked in the last hour", "sum(increase(keybroker_lockouts_total[1h]))")],
            ),
        ],
    ),
    (
        "Process",
        [
            graph(
                "CPU",
                "CPU seconds per second, user and system together: 1.0 is one core busy.",
                "percentunit",
                6,
                [("cpu", "sum(%s)" % rate("process_cpu_seconds_total"))],
            ),
            graph(
                "Resident memory",
                "Resident set size of the broker process.",
                "bytes",
                6,
                [("rss", "sum(process_resident_memory_bytes)")],
            ),
            graph(
                "Open descriptors",
                "Open file descriptors against the process limit: accept fails "
                "(KeybrokerAcceptFailing) when they meet.",
                "short",
                6,
                [
                    ("open", "sum(process_open_fds)"),
                    ("limit", "sum(process_max_fds)"),
                ],
            ),
            graph(
                "Threads and build",
                "OS threads of the process (cores, pools, ledger, mailer, admin), and the "
                "build each instance runs: a rollout shows as a change of commit.",
                "short",
                6,
                [
                    ("threads", "sum(process_threads)"),
                    ("{{version}} {{commit}}", "sum by (version, commit) (keybroker_build_info)"),
                ],
            ),
        ],
    ),
]


def render():
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def off_schema(path):
    """Where the JSON at `path` holds what the SDK's models do not: the
    committed file read back through them and written again must be
    unchanged, and each panel's type must be one the SDK knows."""
    # The panel and query types: without them their options, field config
    # and targets would read back as opaque dicts, unchecked.
    cogplugins.register_default_plugins()
    with open(path) as f:
        doc = json.load(f)
    back = json.loads(json.dumps(model.Dashboard.from_json(doc), cls=JSONEncoder))
    problems = list(diff(doc, back, "$"))
    for p in doc.get("panels", []):
        if p.get("type") != "row" and cogruntime.panelcfg_config(p.get("type", "")) is None:
            problems.append("$.panels[%s]: unknown panel type %r" % (p.get("id"), p.get("type")))
    return problems


def diff(a, b, where):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                yield "%s.%s: not in Grafana's schema" % (where, k)
            else:
                yield from diff(a[k], b[k], "%s.%s" % (where, k))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff(x, y, "%s[%d]" % (where, i))
    elif a != b:
        yield "%s: %r reads back as %r" % (where, a, b)


def main():
    text = render()
    if "--check" not in sys.argv[1:]:
        with open(OUT, "w") as f:
            f.write(text)
        return
    with open(OUT) as f:
        committed = f.read()
    problems = off_schema(OUT)
    if committed != text:
        problems.append("%s differs from what %s builds: run it" % (OUT, sys.argv[0]))
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
