#!/bin/sh
# Print every PromQL expression used by the alert rules and the Grafana
# dashboard, one per line, ready to send to a Prometheus /api/v1/query.
#
#   ops/check-queries.sh                 # all expressions, deduplicated
#   ops/check-queries.sh --source        # "<file>:<where>\t<expr>" per line
#   ops/check-queries.sh RULES.yml DASH.json ...   # other files
#   ops/check-queries.sh --var instance=127.0.0.1:9464 --var job=keybroker
#
# Grafana's interval macros ($__rate_interval, $__interval, $__range, ...)
# become 1m. With --var NAME=VALUE, a template variable ($NAME, ${NAME},
# [[NAME]]) becomes VALUE, and a variable left without one is an error: a
# query checked with a variable dropped is not the query Grafana sends.
# Without any --var, label matchers whose value uses a variable are
# dropped. Multi-line expressions are joined onto one line and PromQL
# comments are removed. Exits non-zero if a file yields no expression.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec python3 - "$here" "$@" <<'PY'
import json, os, re, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head

here = sys.argv[1]
args, values = [], {}
it = iter(sys.argv[2:])
for a in it:
    if a == "--var":
        name, _, value = next(it, "").partition("=")
        values[name] = value
    elif a != "--source":
        args.append(a)
with_source = "--source" in sys.argv[2:]
files = args or [os.path.join(here, "prometheus", "alerts.yml"),
                 os.path.join(here, "grafana", "dashboards", "keybroker.json")]

MACRO = re.compile(r"\$\{?__(rate_interval|interval|interval_ms|range|range_s|range_ms)\}?")
VAR = r"(\$\{[^}]+\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]+\]\])"
# name op "value containing a variable", with the comma before or after it
MATCHER = re.compile(r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=~|!~|!=|=)\s*"[^"]*' + VAR + r'[^"]*"\s*')

def clean(expr):
    lines = []
    for line in expr.splitlines():
        # a '#' outside a string starts a PromQL comment
        out, q = [], None
        for ch in line:
            if q:
                out.append(ch)
                if ch == q:
                    q = None
            elif ch in "\"'`":
                q = ch
                out.append(ch)
            elif ch == "#":
                break
            else:
                out.append(ch)
        lines.append("".join(out))
    e = " ".join(" ".join(lines).split())
    e = MACRO.sub("1m", e)
    if values:
        e = re.sub(VAR, lambda m: values.get(m.group(1).strip("${}[]"), m.group(1)), e)
        left = re.search(VAR, e)
        if left:
            sys.exit("check-queries: no --var for %s in %s" % (left.group(1), e))
    e = MATCHER.sub("", e)
    e = re.sub(r",\s*,", ",", e)
    e = re.sub(r"\{\s*,", "{", e)
    e = re.sub(r",\s*\}", "}", e)
    e = re.sub(r"([A-Za-z0-9_:])\{\}", r"\1", e)
    return e.strip()

def load_yaml(path):
    try:
        import yaml
    except ImportError:
        return None
    with open(path) as f:
        return yaml.safe_load(f)

def rules_exprs(path):
    doc = load_yaml(path)
    if doc is not None:
        if not isinstance(doc, dict):
            return
        for g in doc.get("groups") or []:
            for r in g.get("rules") or []:
                if "expr" in r:
                    yield r.get("alert") or r.get("record") or g.get("name"), str(r["expr"])
        return
    # Fallback without PyYAML: "expr: ..." inline, or a '|' / '>' block.
    lines = open(path).read().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        i += 1
        if rest[:1] in ("|", ">"):
            body = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            rest = "\n".join(body)
        elif len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "'\"":
            rest = rest[1:-1].replace("''", "'") if rest[0] == "'" else json.loads(rest)
        yield "line %d" % i, rest

def dash_exprs(path):
    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title", where)
            for t in node.get("targets") or []:
                if isinstance(t, dict) and t.get("expr") and not t.get("hide"):
                    yield "%s/%s" % (title, t.get("refId", "?")), t["expr"]
            for k, v in node.items():
                if k != "targets":
                    yield from walk(v, title)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v, where)
    with open(path) as f:
        yield from walk(json.load(f), "")

seen, bad = set(), []
for path in files:
    gen = dash_exprs(path) if path.endswith(".json") else rules_exprs(path)
    n = 0
    for where, expr in gen:
        e = clean(expr)
        if not e:
            continue
        n += 1
        if with_source:
            print("%s:%s\t%s" % (os.path.relpath(path), where, e))
        elif e not in seen:
            seen.add(e)
            print(e)
    if n == 0:
        bad.append(path)
if bad:
    sys.exit("check-queries: no expressions found in " + ", ".join(bad))
PY
