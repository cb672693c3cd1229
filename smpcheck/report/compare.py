"""Side-by-side comparison of strategies from their JSON reports: per-rank and node-total peak
host memory, time to a ready model, and the checks' verdicts, as ratios to the model's size
and to naive loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from smpcheck.phases import bounded
from smpcheck.report.model import Report

MIB = 2**20


def summarize(strategy: str, report: Report) -> dict[str, Any]:
    """One row: what this strategy cost and whether its checks passed."""
    records = report.memory.get("ranks", [])
    model_bytes = report.environment.get("model_bytes") or 1
    per_rank = []
    ready_s = 0.0
    for record in records:
        phases = bounded(record["phases"])
        peak = max((p["peak_anon"] for p in phases), default=record["baseline_anon"])
        per_rank.append({"rank": record["rank"], "peak": peak,
                         "above_baseline": peak - record["baseline_anon"]})
        if record["rank"] == 0:
            ready_s = sum(p["end"] - p["start"] for p in phases)
    node_total = sum(r["above_baseline"] for r in per_rank)
    failed = [r.name for r in report.results if r.status.value in ("fail", "error")]
    return {"strategy": strategy, "ok": report.ok, "failed": failed, "ready_s": ready_s,
            "node_total": node_total, "node_total_x_model": node_total / model_bytes,
            "rank0_x_model": per_rank[0]["above_baseline"] / model_bytes if per_rank else 0,
            "per_rank": per_rank, "model_bytes": model_bytes}


def compare(reports: dict[str, Report]) -> dict[str, Any]:
    rows = [summarize(name, report) for name, report in reports.items()]
    naive = next((r for r in rows if r["strategy"] == "naive"), None)
    for row in rows:
        row["node_total_x_naive"] = (row["node_total"] / naive["node_total"]
                                     if naive and naive["node_total"] else None)
        row["ready_x_naive"] = row["ready_s"] / naive["ready_s"] if naive and naive[
            "ready_s"] else None
    env = next(iter(reports.values())).environment if reports else {}
    return {"rows": rows, "environment": env}


def write_comparison(reports: dict[str, Report], directory: str | Path, stem: str) -> Path:
    """``stem.json`` (the rows) and ``stem.html`` (a table), self-contained."""
    data = compare(reports)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))
    env = Environment(loader=PackageLoader("smpcheck.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("compare.html.j2").render(mib=MIB, **data)
    path = directory / f"{stem}.html"
    path.write_text(html)
    return path


def text_table(data: dict[str, Any]) -> str:
    lines = [f"{'strategy':10} {'checks':8} {'ready s':>8} {'node MiB':>9} {'x model':>8} "
             f"{'x naive':>8} {'rank0 x model':>14}"]
    for r in data["rows"]:
        naive = f"{r['node_total_x_naive']:.2f}" if r["node_total_x_naive"] is not None else "-"
        lines.append(f"{r['strategy']:10} {'pass' if r['ok'] else 'FAIL':8} {r['ready_s']:8.2f} "
                     f"{r['node_total'] / MIB:9.0f} {r['node_total_x_model']:8.2f} {naive:>8} "
                     f"{r['rank0_x_model']:14.2f}")
    return "\n".join(lines)
