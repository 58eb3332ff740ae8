#!/usr/bin/env python3
"""Keeps the deploy kit in step with the metrics tether exports.

    metrics.py names                    print every metric: name, type, where from
    metrics.py scrape FILE              a live /metrics text must declare exactly the
                                        families src/metrics.rs registers
    metrics.py cover DASHBOARD RULES... every metric appears in the dashboard, and
                                        every tether_* name in the dashboard and the
                                        rules is one tether exports
    metrics.py promql DASHBOARD OUT     write the dashboard's queries as a rule file
                                        (Grafana variables replaced) for
                                        `promtool check rules` to parse

The list comes from src/metrics.rs (each `"name", "help" => field` line of
its `register!` call, typed by the field's declaration), plus the metrics of
issue 12 (admission control), whose names were fixed before they landed:
once they are in src/metrics.rs too, the two agree and nothing changes.
Exits 1 with one line per problem.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "metrics.rs"

# Issue 12 (admission control): names fixed across the parallel branches.
ISSUE_12 = {
    "backend_in_flight": "gauge",
    "backend_queued": "gauge",
    "queue_wait_seconds": "histogram",
    "admission_rejected": "counter",
    "rate_limited": "counter",
    "rate_limit_keys": "gauge",
}

PREFIX = "tether_"


def source_metrics(text):
    """{name without prefix: type} from the text of src/metrics.rs."""
    struct = re.search(r"pub\(crate\) struct Metrics \{(.*?)\n\}", text, re.S)
    if not struct:
        raise SystemExit("src/metrics.rs: struct Metrics not found")
    kinds = {}
    for field, ty in re.findall(r"^\s*(\w+): (.+),\s*$", struct.group(1), re.M):
        for kind in ("Counter", "Gauge", "Histogram"):
            if re.search(rf"\b{kind}\b", ty):
                kinds[field] = kind.lower()
    block = re.search(r"register!\(registry, m,(.*?)\);", text, re.S)
    if not block:
        raise SystemExit("src/metrics.rs: the register! call was not found")
    out = {}
    for name, field in re.findall(r'"(\w+)",\s*"[^"]*"\s*=>\s*(\w+)', block.group(1)):
        if field not in kinds:
            raise SystemExit(f"src/metrics.rs: field {field} (metric {name}) has no known type")
        out[name] = kinds[field]
    if not out:
        raise SystemExit("src/metrics.rs: no metric found in register!")
    return out


def all_metrics():
    """{name: (type, origin)}: src/metrics.rs and issue 12."""
    found = {n: (t, "src/metrics.rs") for n, t in source_metrics(SOURCE.read_text()).items()}
    for n, t in ISSUE_12.items():
        found.setdefault(n, (t, "issue 12"))
    return found


def samples(name, kind):
    """The sample names Prometheus stores for a family."""
    full = PREFIX + name
    if kind == "counter":
        return [full + "_total"]
    if kind == "histogram":
        return [full + "_bucket", full + "_sum", full + "_count"]
    return [full]


def used_names(text):
    """Every tether_* identifier in a text."""
    return set(re.findall(r"\btether_[A-Za-z0-9_]+", text))


def dashboard_exprs(path, variables=True):
    """Every PromQL expression of a Grafana dashboard: each panel target's
    `expr` and (with variables) each query variable's query."""
    board = json.loads(Path(path).read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(board.get("panels", []))
    if variables:
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                query = var.get("query")
                exprs.append(query.get("query", "") if isinstance(query, dict) else str(query))
    return exprs


def cmd_names():
    for name, (kind, origin) in sorted(all_metrics().items()):
        print(f"{PREFIX}{name}\t{kind}\t{origin}")
    return 0


def cmd_scrape(path):
    declared = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m and m.group(1).startswith(PREFIX):
            declared[m.group(1)[len(PREFIX):]] = m.group(2)
    src = source_metrics(SOURCE.read_text())
    problems = []
    for n in sorted(set(src) - set(declared)):
        problems.append(f"src/metrics.rs registers {PREFIX}{n} but the live /metrics does not declare it")
    for n in sorted(set(declared) - set(src)):
        problems.append(f"the live /metrics declares {PREFIX}{n}, which metrics.py did not find in src/metrics.rs")
    for n in sorted(set(src) & set(declared)):
        if src[n] != declared[n]:
            problems.append(f"{PREFIX}{n}: {src[n]} in src/metrics.rs, {declared[n]} on /metrics")
    for p in problems:
        print(p)
    if not problems:
        print(f"live /metrics declares the {len(src)} families of src/metrics.rs")
    return 1 if problems else 0


def cmd_cover(dashboard, rules):
    metrics = all_metrics()
    known = {s for n, (k, _) in metrics.items() for s in samples(n, k)}
    exprs = dashboard_exprs(dashboard)
    if not exprs:
        print(f"{dashboard}: no PromQL expression found")
        return 1
    dash_used = set().union(*(used_names(e) for e in exprs))
    problems = []
    for name, (kind, origin) in sorted(metrics.items()):
        if not set(samples(name, kind)) & dash_used:
            want = " or ".join(samples(name, kind))
            problems.append(f"{dashboard}: no panel queries {want} ({kind}, {origin})")
    for path, names in [(dashboard, dash_used)] + [(r, used_names(Path(r).read_text())) for r in rules]:
        for n in sorted(names - known):
            problems.append(f"{path}: {n} is not a metric tether exports")
    for p in problems:
        print(p)
    if not problems:
        print(f"{dashboard}: all {len(metrics)} metrics charted; no unknown tether_* name in it or in {', '.join(rules)}")
    return 1 if problems else 0


def cmd_promql(dashboard, out):
    exprs = dashboard_exprs(dashboard, variables=False)
    rules = []
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$job", ".+").replace("$instance", ".+")
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    # JSON is YAML: promtool reads it as a rule file.
    Path(out).write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))
    print(f"{len(rules)} dashboard queries written to {out}")
    return 0


def main(argv):
    if argv[:1] == ["names"] and len(argv) == 1:
        return cmd_names()
    if argv[:1] == ["scrape"] and len(argv) == 2:
        return cmd_scrape(argv[1])
    if argv[:1] == ["promql"] and len(argv) == 3:
        return cmd_promql(argv[1], argv[2])
    if argv[:1] == ["cover"] and len(argv) >= 2:
        return cmd_cover(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
