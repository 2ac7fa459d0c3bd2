#!/usr/bin/env python3
"""The operator's dashboard and alert rules against real data.

1. The Grafana dashboard (deploy/grafana/callnotify.json) is checked against what an
   import needs: a title and uid, the data source input and variable every query uses,
   unique panel ids, panels inside the 24-column grid and not overlapping, each query
   with a refId and an expression, every variable it uses defined.
2. A real Prometheus scrapes an engine under traffic (the load tester's run, on the mock
   cluster) every second; then every expression of the dashboard must return data, and
   every alert rule's expression must evaluate, each metric it names being one the
   engine serves. A metric name that does not exist fails the check.

    python3 scripts/prometheus-check.py --loadtest target/debug/callnotify-loadtest

With `--plot FILE.svg` it also draws some of the dashboard's panels from what Prometheus
recorded (the picture in docs/operating.md of what the dashboard shows).
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "callnotify.json")
RULES = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


def fail(message):
    print(f"prometheus-check: {message}", file=sys.stderr)
    sys.exit(1)


def dashboard_queries(dashboard):
    """Checks the dashboard's structure; returns (panel title, expression) of every query."""
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        if key not in dashboard:
            fail(f"dashboard: no {key!r}")
    if not any(i.get("type") == "datasource" and i.get("pluginId") == "prometheus" for i in dashboard.get("__inputs", [])):
        fail("dashboard: no Prometheus data source input for import")
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    if "datasource" not in variables:
        fail("dashboard: no data source variable")
    ids, cells, queries = set(), set(), []
    for panel in dashboard["panels"]:
        title = panel.get("title") or fail(f"dashboard: panel {panel.get('id')} has no title")
        if panel.get("id") in ids or not isinstance(panel.get("id"), int):
            fail(f"dashboard: panel {title!r}: id {panel.get('id')!r} missing or used twice")
        ids.add(panel["id"])
        grid = panel.get("gridPos") or fail(f"dashboard: panel {title!r} has no gridPos")
        if grid["x"] < 0 or grid["w"] < 1 or grid["x"] + grid["w"] > 24:
            fail(f"dashboard: panel {title!r} leaves the 24-column grid")
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    fail(f"dashboard: panel {title!r} overlaps another")
                cells.add((x, y))
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"dashboard: panel {title!r} does not use the data source variable")
        refs = set()
        for target in panel.get("targets") or fail(f"dashboard: panel {title!r} has no query"):
            expr, ref = target.get("expr"), target.get("refId")
            if not expr or not ref or ref in refs:
                fail(f"dashboard: panel {title!r}: a query without an expression or a unique refId")
            refs.add(ref)
            for used in re.findall(r"\$(\w+)", expr):
                if used not in variables and used not in BUILTIN_VARIABLES:
                    fail(f"dashboard: panel {title!r} uses ${used}, which is not defined")
            queries.append((title, expr))
    return queries


def rule_expressions():
    """(alert name, expression) of every rule; parsed without a YAML library."""
    rules, name, lines = [], None, open(RULES).read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        found = re.match(r"\s*- alert: (\w+)", line)
        if found:
            name = found.group(1)
        found = re.match(r"(\s*)expr: (.*)", line)
        if found:
            indent, value = len(found.group(1)), found.group(2)
            if value.startswith(">"):
                value, i = "", i + 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    value += " " + lines[i].strip()
                    i += 1
                i -= 1
            rules.append((name, value.strip()))
        i += 1
    return rules


def rules_documented(rules):
    """Every alert rule has its row in the operator guide's table and its section in the
    runbook (docs/operating.md, docs/alerts.md): an operator paged by one finds it."""
    operating = open(os.path.join(ROOT, "docs", "operating.md")).read()
    runbook = open(os.path.join(ROOT, "docs", "alerts.md")).read()
    for name, _ in rules:
        if not re.search(rf"^\| {name} \|", operating, re.M):
            fail(f"alert {name}: no row in docs/operating.md's alert table")
        if not re.search(rf"^## {name}$", runbook, re.M):
            fail(f"alert {name}: no section in docs/alerts.md")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(prometheus, expr):
    url = f"http://{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        return json.load(e)


def for_prometheus(expr):
    """A dashboard expression as Prometheus takes it: Grafana's variables filled in."""
    # Grafana's $__rate_interval is four scrape intervals at least; scrapes here are 1 s.
    return expr.replace("$__rate_interval", "15s").replace("$instance", ".*")


PLOTTED = [
    "CDRs consumed and notified",
    "Mails sent, failed, retried, delayed",
    "Latency p50 / p99 (call end → mail accepted)",
    "Consumers paused, CDRs in flight",
]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]


def legend_of(template, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def plot(prometheus, dashboard, start, end, path):
    """Small multiples of the PLOTTED panels over [start, end], as the dashboard draws them."""
    panels = [p for p in dashboard["panels"] if p.get("title") in PLOTTED]
    width, height, pad = 460, 200, 44
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{2 * height}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="100%" height="100%" fill="white"/>']
    for n, panel in enumerate(panels):
        ox, oy = (n % 2) * width, (n // 2) * height
        lines = []
        for target in panel["targets"]:
            url = f"http://{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(
                {"query": for_prometheus(target["expr"]), "start": start, "end": end, "step": 1})
            with urllib.request.urlopen(url, timeout=10) as response:
                for series in json.load(response)["data"]["result"]:
                    points = [(float(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                    if points:
                        lines.append((legend_of(target["legendFormat"], series["metric"]), points))
        top = max([v for _, pts in lines for _, v in pts] + [1e-9]) * 1.1
        unit = panel["fieldConfig"]["defaults"]["unit"]
        x0, y0, w, h = ox + pad, oy + 24, width - pad - 12, height - 48
        out.append(f'<text x="{ox + 8}" y="{oy + 16}" font-weight="bold">{panel["title"]}</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>')
        label = {"ops": "/s", "s": " s"}.get(unit, "")
        out.append(f'<text x="{x0 - 4}" y="{y0 + 8}" text-anchor="end">{top:.3g}{label}</text>')
        out.append(f'<text x="{x0 - 4}" y="{y0 + h}" text-anchor="end">0</text>')
        out.append(f'<text x="{x0 + w}" y="{y0 + h + 12}" text-anchor="end">{end - start:.0f} s</text>')
        for i, (name, points) in enumerate(lines[:5]):
            xy = " ".join(f"{x0 + (t - start) / (end - start) * w:.1f},{y0 + h - v / top * h:.1f}" for t, v in points)
            out.append(f'<polyline points="{xy}" fill="none" stroke="{COLOURS[i]}" stroke-width="1.5"/>')
            out.append(f'<text x="{x0 + 6}" y="{y0 + 14 + i * 13}" fill="{COLOURS[i]}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"prometheus-check: {len(panels)} panels drawn into {path}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--loadtest", required=True, help="the callnotify-loadtest binary")
    parser.add_argument("--seconds", type=int, default=20, help="traffic before the queries")
    parser.add_argument("--plot", help="draw some panels from the recorded data into this SVG file")
    args = parser.parse_args()

    queries = dashboard_queries(json.load(open(DASHBOARD)))
    rules = rule_expressions()
    rules_documented(rules)
    print(f"prometheus-check: dashboard structure ok ({len(queries)} queries); {len(rules)} alert rules")

    work = tempfile.mkdtemp(prefix="prometheus-check.")
    engine, prometheus = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with open(os.path.join(work, "prometheus.yml"), "w") as config:
        config.write(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            f"scrape_configs:\n  - job_name: callnotify\n    static_configs:\n      - targets: ['{engine}']\n"
        )
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml", f"--storage.tsdb.path={work}/data",
             f"--web.listen-address={prometheus}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w")))
        # A run longer than the wait: the queries happen while CDRs still flow.
        procs.append(subprocess.Popen(
            [args.loadtest, "run", "--numbers", "20000", "--subscribed", "0.2", "--rate", "300",
             "--duration", f"{args.seconds + 30}s", "--quiet", "--metrics-listen", engine,
             "--out", os.path.join(work, "report"), "--workdir", os.path.join(work, "engine")],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "loadtest.log"), "w")))
        deadline = time.time() + 120
        while True:
            try:
                up = query(prometheus, 'up{job="callnotify"} == 1')
            except urllib.error.URLError:
                up = None  # Prometheus not listening yet
            if up and up.get("data", {}).get("result"):
                break
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                fail(f"the engine was never scraped; logs in {work}")
            time.sleep(1)
        print(f"prometheus-check: Prometheus scrapes the engine at {engine}; {args.seconds} s of traffic")
        time.sleep(args.seconds)

        if args.plot:
            plot(prometheus, json.load(open(DASHBOARD)), time.time() - args.seconds, time.time(), args.plot)
        served = {s["metric"]["__name__"] for s in query(prometheus, '{job="callnotify"}')["data"]["result"]}
        problems = []
        for title, expr in queries:
            answer = query(prometheus, for_prometheus(expr))
            if answer.get("status") != "success":
                problems.append(f"panel {title!r}: {expr}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                problems.append(f"panel {title!r}: no data for {expr}")
        for name, expr in rules:
            answer = query(prometheus, expr)
            if answer.get("status") != "success":
                problems.append(f"alert {name}: {answer.get('error')}")
        for source, expr in queries + rules:
            for metric in set(re.findall(r"\b(callnotify_[a-z_]+|up)\b", expr)):
                if metric != "up" and metric not in served:
                    problems.append(f"{source}: {metric} is not a metric the engine serves")
        if problems:
            fail("\n  " + "\n  ".join(sorted(set(problems))) + f"\n(logs in {work})")
        print(f"prometheus-check: all {len(queries)} dashboard queries return data; all {len(rules)} alert "
              f"expressions evaluate and name only served metrics ({len(served)} served)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
