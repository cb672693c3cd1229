"""Side-by-side comparison of strategies from their JSON reports: per-rank and node-total peak
host memory, time to a ready model, and the checks' verdicts, as ratios to the model's size
and to naive loading, as a chart and a table. Peaks are given for the strategy's own phases
(load, transform, wrap: what its memory bound covers) and for the whole run (smpcheck's
check and forward phases too), the latter beside ``smpcheck plan``'s prediction of it.
Strategies that measured how they loaded (accelerate's path: did each rank read the
checkpoint itself?) carry that line along."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from smpcheck.memory.phases import bounded
from smpcheck.report.chart import compare_svg
from smpcheck.report.model import Report
from smpcheck.report.units import human_bytes


def summarize(strategy: str, report: Report) -> dict[str, Any]:
    """One row: what this strategy cost and whether its checks passed."""
    records = report.memory.get("ranks", [])
    model_bytes = report.environment.get("model_bytes") or 1
    per_rank = []
    ready_s = 0.0
    for record in records:
        phases = bounded(record["phases"])
        base = record["baseline_anon"]
        peak = max((p["peak_anon"] for p in phases), default=base)
        # the whole run: smpcheck's own check and forward phases too (what a node must hold
        # for `smpcheck run` itself, not only for the strategy under test)
        peak_all = max((p["peak_anon"] for p in record["phases"]), default=base)
        by_phase: dict[str, int] = {}
        for p in record["phases"]:
            by_phase[p["name"]] = max(by_phase.get(p["name"], 0), p["peak_anon"] - base)
        per_rank.append({"rank": record["rank"], "peak": peak, "above_baseline": peak - base,
                         "peak_all": peak_all, "above_baseline_all": peak_all - base,
                         "baseline": base, "phases": by_phase})
        if record["rank"] == 0:
            ready_s = sum(p["end"] - p["start"] for p in phases)
    node_total = sum(r["above_baseline"] for r in per_rank)
    node_total_all = sum(r["above_baseline_all"] for r in per_rank)
    failed = [r.name for r in report.results if r.status.value in ("fail", "error")]
    rank0 = per_rank[0]["above_baseline"] if per_rank else 0
    rank0_all = per_rank[0]["above_baseline_all"] if per_rank else 0
    env = report.environment
    return {"strategy": strategy, "ok": report.ok, "failed": failed, "ready_s": ready_s,
            "node_total": node_total, "node_total_x_model": node_total / model_bytes,
            "rank0": rank0, "rank0_x_model": rank0 / model_bytes,
            "node_total_all": node_total_all,
            "node_total_all_x_model": node_total_all / model_bytes, "rank0_all": rank0_all,
            "per_rank": per_rank, "model_bytes": model_bytes,
            "loading_verdict": env.get("loading_verdict", ""),
            "loading": env.get("loading", [])}


def compare(reports: dict[str, Report],
            plan: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The rows side by side, each beside ``smpcheck plan``'s prediction for it (``plan``:
    strategy -> its plan row, made by the caller: the report never reaches up into the
    strategies; a strategy without one has empty plan columns)."""
    rows = [summarize(name, report) for name, report in reports.items()]
    naive = next((r for r in rows if r["strategy"] == "naive"), None)
    plan = plan or {}
    for row in rows:
        row["node_total_x_naive"] = (row["node_total"] / naive["node_total"]
                                     if naive and naive["node_total"] else None)
        row["ready_x_naive"] = row["ready_s"] / naive["ready_s"] if naive and naive[
            "ready_s"] else None
        row.update(_beside_plan(row, plan.get(row["strategy"])))
    env = next(iter(reports.values())).environment if reports else {}
    return {"rows": rows, "environment": env}


def _beside_plan(row: dict[str, Any], planned: dict[str, Any] | None) -> dict[str, Any]:
    """The plan's whole-run node and rank-0 peaks for this row, and their errors (%)."""
    if not planned:
        return {"plan_node_total": None, "plan_rank0": None, "plan_node_error_pct": None,
                "plan_rank0_error_pct": None}

    def error(predicted: int, measured: int) -> float | None:
        return 100 * (predicted - measured) / measured if measured > 0 else None

    return {"plan_node_total": planned["node_peak_bytes"],
            "plan_rank0": planned["rank0_peak_bytes"],
            "plan_node_error_pct": error(planned["node_peak_bytes"], row["node_total_all"]),
            "plan_rank0_error_pct": error(planned["rank0_peak_bytes"], row["rank0_all"])}


def write_comparison(reports: dict[str, Report], directory: str | Path, stem: str,
                     plan: dict[str, dict[str, Any]] | None = None) -> Path:
    """``stem.json`` (the rows) and ``stem.html`` (a chart and a table), self-contained."""
    data = compare(reports, plan)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))
    env = Environment(loader=PackageLoader("smpcheck.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    env.filters["human"] = human_bytes
    html = env.get_template("compare.html.j2").render(chart=compare_svg(data["rows"]), **data)
    path = directory / f"{stem}.html"
    path.write_text(html)
    return path


def text_table(data: dict[str, Any]) -> str:
    width = max([10, *(len(r["strategy"]) for r in data["rows"])])
    lines = [f"{'strategy':{width}} {'checks':8} {'ready s':>8} {'node peak':>11} {'x model':>8} "
             f"{'x naive':>8} {'rank0 x model':>14} {'whole run':>11} {'plan':>11} {'error':>7}"]
    for r in data["rows"]:
        naive = f"{r['node_total_x_naive']:.2f}" if r["node_total_x_naive"] is not None else "-"
        plan = human_bytes(r["plan_node_total"]) if r.get("plan_node_total") else "-"
        error = (f"{r['plan_node_error_pct']:+.0f}%" if r.get("plan_node_error_pct") is not None
                 else "-")
        lines.append(f"{r['strategy']:{width}} {'pass' if r['ok'] else 'FAIL':8} "
                     f"{r['ready_s']:8.2f} {human_bytes(r['node_total']):>11} "
                     f"{r['node_total_x_model']:8.2f} {naive:>8} {r['rank0_x_model']:14.2f} "
                     f"{human_bytes(r['node_total_all']):>11} {plan:>11} {error:>7}")
    lines += [f"{r['strategy']}: {r['loading_verdict']}" for r in data["rows"]
              if r["loading_verdict"]]
    return "\n".join(lines)
