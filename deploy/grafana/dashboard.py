#!/usr/bin/env python3
"""Writes deploy/grafana/tether.json, the Grafana dashboard of the kit.

    python3 deploy/grafana/dashboard.py           # rewrite tether.json
    python3 deploy/grafana/dashboard.py --check   # exit 1 if tether.json differs

Edit the panels here, not in the JSON (or export from Grafana and fold the
change back in): deploy/check.sh fails when the two disagree, and
deploy/metrics.py fails when a metric tether exports has no panel.
Every query is filtered by the dashboard's `job` and `instance` variables.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tether.json"
SEL = '{job=~"$job", instance=~"$instance"}'
DS = {"type": "prometheus", "uid": "${datasource}"}


def q(expr, legend):
    """One query; `SEL` in expr becomes the job/instance selector (merged
    with any labels the expression already has)."""
    expr = expr.replace("{SEL,", SEL[:-1] + ", ").replace(" SEL", SEL).replace("SEL", SEL)
    return {"expr": expr, "legendFormat": legend}


def rate(metric, by=None, extra=""):
    labels = "{SEL" + ("," + extra if extra else "") + "}" if extra else "SEL"
    inner = f"rate({metric}{labels}[$__rate_interval])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantiles(metric, by=None):
    grp = f"le, {by}" if by else "le"
    leg = f"{{{{{by}}}}} " if by else ""
    return [
        q(f"histogram_quantile({p}, sum by ({grp}) (rate({metric}_bucket SEL[$__rate_interval])))",
          f"{leg}p{int(p * 100)}")
        for p in (0.5, 0.99)
    ]


# (row title, [(panel title, unit, description, [queries])])
ROWS = [
    ("Traffic", [
        ("Requests by status class", "reqps", "tether_requests_total by class",
         [q(rate("tether_requests_total", "class"), "{{class}}")]),
        ("Requests by worker", "reqps", "tether_requests_total by backend (none: answered by tether itself)",
         [q(rate("tether_requests_total", "backend"), "{{backend}}")]),
        ("5xx share", "percentunit", "5xx responses / all responses",
         [q(rate("tether_requests_total", extra='class="5xx"') + " / " + rate("tether_requests_total"), "5xx")]),
        ("Latency to response head", "s", "tether_request_duration_seconds",
         quantiles("tether_request_duration_seconds")
         + [q("sum(rate(tether_request_duration_seconds_sum SEL[$__rate_interval])) / "
              "sum(rate(tether_request_duration_seconds_count SEL[$__rate_interval]))", "mean")]),
        ("Open client connections", "short", "tether_connections per replica",
         [q("tether_connections SEL", "{{instance}}")]),
        ("Connections refused (max_connections)", "cps", "tether_connections_refused_total",
         [q(rate("tether_connections_refused_total", "instance"), "{{instance}}")]),
        ("Retries", "reqps", "tether_retries_total: requests sent again",
         [q(rate("tether_retries_total", "instance"), "{{instance}}")]),
    ]),
    ("Workers", [
        ("Worker up", "short", "tether_backend_up: 1 usable, 0 down or ejected (per replica's view)",
         [q("min by (backend) (tether_backend_up SEL)", "{{backend}}")]),
        ("Live sessions per worker", "short", "tether_backend_sessions (swept every 30 s)",
         [q("max by (backend) (tether_backend_sessions SEL)", "{{backend}}")]),
        ("Failed health probes", "short", "tether_probes_total{result=\"fail\"}; ok probes for scale",
         [q(rate("tether_probes_total", "backend, result"), "{{backend}} {{result}}")]),
        ("Ejections and restarts", "short", "tether_ejections_total and tether_instance_changes_total",
         [q("sum by (backend) (increase(tether_ejections_total SEL[$__rate_interval]))", "ejected {{backend}}"),
          q("sum by (backend) (increase(tether_instance_changes_total SEL[$__rate_interval]))", "restarted {{backend}}")]),
        ("In flight per worker", "short", "tether_backend_in_flight (admission control)",
         [q("sum by (backend) (tether_backend_in_flight SEL)", "{{backend}}")]),
        ("Queued per worker", "short", "tether_backend_queued: requests waiting for a slot",
         [q("sum by (backend) (tether_backend_queued SEL)", "{{backend}}")]),
        ("Queue wait", "s", "tether_queue_wait_seconds",
         quantiles("tether_queue_wait_seconds", "backend")),
        ("Admission rejected", "reqps", "tether_admission_rejected_total by reason (queue_timeout, queue_full)",
         [q(rate("tether_admission_rejected_total", "backend, reason"), "{{backend}} {{reason}}")]),
    ]),
    ("Sessions and restores", [
        ("Moves by outcome", "short", "tether_restores_total: ok, followed, partial, failed, waiting",
         [q("sum by (outcome) (increase(tether_restores_total SEL[$__rate_interval]))", "{{outcome}}")]),
        ("Move duration", "s", "tether_restore_duration_seconds: pending captures, re-pin, restore",
         quantiles("tether_restore_duration_seconds")),
        ("Re-pins by reason", "short", "tether_repins_total",
         [q("sum by (reason) (increase(tether_repins_total SEL[$__rate_interval]))", "{{reason}}")]),
        ("Cookies rejected", "short", "tether_cookie_rejects_total: treated as a new session",
         [q("sum by (reason) (increase(tether_cookie_rejects_total SEL[$__rate_interval]))", "{{reason}}")]),
    ]),
    ("Capture and store", [
        ("Store up", "short", "tether_store_up: 1 connected, 0 degraded",
         [q("tether_store_up SEL", "{{instance}}")]),
        ("Capture queue (lag)", "short", "tether_capture_queue: threads with a capture waiting or running",
         [q("tether_capture_queue SEL", "{{instance}}")]),
        ("Captures by result", "short", "tether_captures_total: ok, error, buffered, lost",
         [q("sum by (reason) (increase(tether_captures_total SEL[$__rate_interval]))", "{{reason}}")]),
        ("Entries captured", "ops", "tether_captured_entries_total",
         [q(rate("tether_captured_entries_total"), "entries/s")]),
        ("Outage buffer", "bytes", "tether_capture_buffered_bytes (bytes) and tether_capture_buffered (captures, right axis)",
         [q("tether_capture_buffered_bytes SEL", "bytes {{instance}}"),
          q("tether_capture_buffered SEL", "captures {{instance}}")]),
        ("Dropped and refused", "short",
         "tether_capture_dropped_total (queue full: answers marked partial), "
         "tether_capture_buffer_dropped_total (store down, buffer full), "
         "tether_capture_fenced_total (older epoch), tether_store_writes_dropped_total",
         [q("sum(increase(tether_capture_dropped_total SEL[$__rate_interval]))", "capture queue full"),
          q("sum(increase(tether_capture_buffer_dropped_total SEL[$__rate_interval]))", "buffer full"),
          q("sum(increase(tether_capture_fenced_total SEL[$__rate_interval]))", "fenced"),
          q("sum(increase(tether_store_writes_dropped_total SEL[$__rate_interval]))", "session writes")]),
    ]),
    ("Edge and operations", [
        ("Rate limited", "reqps", "tether_rate_limited_total by rule",
         [q(rate("tether_rate_limited_total", "rule"), "rule {{rule}}")]),
        ("Rate-limit keys tracked", "short", "tether_rate_limit_keys by rule (capped by rate_limit.max_keys)",
         [q("sum by (rule) (tether_rate_limit_keys SEL)", "rule {{rule}}")]),
        ("TLS", "short", "tether_tls_handshake_failures_total and tether_tls_reload_refused_total",
         [q("sum(increase(tether_tls_handshake_failures_total SEL[$__rate_interval]))", "handshake failures"),
          q("sum(increase(tether_tls_reload_refused_total SEL[$__rate_interval]))", "reloads refused")]),
        ("Binary upgrades", "short", "tether_upgrades_total by outcome",
         [q("sum by (outcome) (increase(tether_upgrades_total SEL[$__rate_interval]))", "{{outcome}}")]),
        ("Worker connections", "ops",
         "tether_upstream_connects_total, tether_upstream_verifications_total, tether_upstream_reuses_total",
         [q(rate("tether_upstream_connects_total"), "new"),
          q(rate("tether_upstream_verifications_total"), "checked"),
          q(rate("tether_upstream_reuses_total"), "reused")]),
    ]),
]


def build():
    panels = []
    pid = 1
    y = 0
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        for i, (ptitle, unit, desc, targets) in enumerate(row):
            overrides = []
            if ptitle == "Outage buffer":
                overrides = [{"matcher": {"id": "byRegexp", "options": "captures.*"},
                              "properties": [{"id": "unit", "value": "short"},
                                             {"id": "custom.axisPlacement", "value": "right"}]}]
            panels.append({
                "type": "timeseries",
                "title": ptitle,
                "description": desc,
                "id": pid,
                "datasource": DS,
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10}},
                                "overrides": overrides},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [dict(t, refId=chr(ord("A") + k), datasource=DS) for k, t in enumerate(targets)],
            })
            pid += 1
        y += ((len(row) + 2) // 3) * 8
    return {
        "title": "tether",
        "uid": "tether",
        "description": "tether sticky-session proxy: traffic, workers, moves and restores, capture and store, edge. "
                       "Generated by deploy/grafana/dashboard.py.",
        "tags": ["tether"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "job", "label": "Job", "type": "query", "datasource": DS,
             "query": {"query": "label_values(tether_backend_up, job)", "refId": "job"},
             "definition": "label_values(tether_backend_up, job)",
             "includeAll": True, "multi": True, "allValue": ".+", "current": {}, "refresh": 2, "hide": 0},
            {"name": "instance", "label": "Replica", "type": "query", "datasource": DS,
             "query": {"query": 'label_values(tether_backend_up{job=~"$job"}, instance)', "refId": "instance"},
             "definition": 'label_values(tether_backend_up{job=~"$job"}, instance)',
             "includeAll": True, "multi": True, "allValue": ".+", "current": {}, "refresh": 2, "hide": 0},
        ]},
        "panels": panels,
    }


def main(argv):
    text = json.dumps(build(), indent=2, sort_keys=True) + "\n"
    if argv == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.name} is not what dashboard.py writes: run python3 deploy/grafana/dashboard.py")
            return 1
        print(f"{OUT.name} matches dashboard.py")
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
