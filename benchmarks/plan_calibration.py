"""Calibrate ``smpcheck plan`` against what ``smpcheck compare`` measures.

Writes three synthetic bf16 Llama checkpoints (about 3e7, 1e8 and 2.7e8 parameters, random
weights), runs ``smpcheck compare`` over every strategy this machine can run (float32 loads:
every rank owns its weights, the "ready to train" case), then ``smpcheck plan --json`` for the
same model, ranks and dtype, and writes predicted next to measured, for the node total and
rank 0, with the error in percent, to ``--out`` (``table.md``, ``calibration.json``; each
size's comparison JSON is kept beside them).

The measured peaks are the whole run's (load, transform, wrap, and smpcheck's own check and
forward phases): anonymous RSS above each rank's idle baseline, summed over the ranks.

    python benchmarks/plan_calibration.py                      # measure, then compare
    python benchmarks/plan_calibration.py --reuse              # recompute the plan only
    python benchmarks/plan_calibration.py --fit                # also print fitted constants

Rerun it after a change to what a phase costs (the forward phase, most of all: see
``smpcheck.memory.plan.FORWARD_EXTRA``): ``--fit`` prints the constants the new measurements give.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (params wanted, hidden, vocab); hidden and vocab chosen so that the embeddings do not
# exceed the size wanted, with at least a few decoder layers in each
SIZES = {"3e7": (3.0e7, 512, 16000), "1e8": (1.0e8, 1024, 32000), "2.7e8": (2.7e8, 1024, 32000)}


def write_checkpoint(path: Path, params: float, hidden: int, vocab: int) -> int:
    """A Llama of about ``params`` parameters in bf16, written once; returns its stored bytes."""
    import torch
    import transformers as T

    if (path / "size.json").exists():
        return int(json.loads((path / "size.json").read_text())["bytes"])
    inter = int(hidden * 2.6875) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                           num_hidden_layers=layers, num_attention_heads=16,
                           num_key_value_heads=4, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    (path / "size.json").write_text(json.dumps({"bytes": size, "layers": layers}))
    return size


def head() -> str:
    """The commit the measurements run at (the checkout's HEAD)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    return done.stdout.strip() or "?"


def available_strategies() -> list[str]:
    """Every strategy ``smpcheck run`` knows that can run here (SMP v2 needs SageMaker)."""
    from smpcheck.strategies import STRATEGIES

    return [name for name, cls in STRATEGIES.items() if cls().unavailable() is None]


def measure(ckpt: Path, strategies: list[str], nproc: int, dtype: str, report_dir: Path) -> dict:
    """``smpcheck compare`` over ``strategies``; its JSON (rows with the whole-run peaks)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "smpcheck", "compare", str(ckpt), "--strategies",
               ",".join(strategies), "--nproc-per-node", str(nproc), "--oversubscribe",
               "--dtype", dtype, "--report-dir", str(report_dir), "--timeout", "3000"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    (report_dir / "compare.log").write_text(done.stdout + done.stderr)
    print(f"  compare exit {done.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((report_dir / f"compare-{ckpt.name}.json").read_text())


def comparison(report_dir: Path, out: Path, size: str) -> None:
    """The comparison of the reports in ``report_dir`` as this checkout writes it (whole-run
    peaks beside the plan's prediction), as ``out/compare-SIZE.{json,html}``."""
    from smpcheck.report.compare import write_comparison
    from smpcheck.report.model import Report
    from smpcheck.run.plan_cli import predicted

    reports = {}
    for path in sorted(report_dir.glob("smpcheck-*-tp*.json")):
        report = Report.from_json(path)
        reports[report.environment["strategy"]] = report
    write_comparison(reports, out, f"compare-{size}", predicted(reports))


def plan_for(ckpt: Path, nproc: int, dtype: str) -> dict:
    """``smpcheck plan --json`` for the same model, ranks and dtype."""
    command = [sys.executable, "-m", "smpcheck", "plan", str(ckpt), "--nproc-per-node",
               str(nproc), "--dtype", dtype, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):  # 1: nothing fits this machine, the plan is printed
        raise RuntimeError(f"smpcheck plan failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def table(rows: list[dict], nproc: int, dtype: str) -> str:
    """Markdown: predicted vs measured node total and rank 0, error in percent."""
    gib = 2**30
    lines = [f"{nproc} ranks on one node (CPU, gloo), `--dtype {dtype}`, whole run (load, "
             "transform, wrap, check, forward); anonymous RSS above each rank's idle baseline.",
             "",
             "| model | strategy | checks | node measured | node predicted | error | "
             "held out | rank 0 measured | rank 0 predicted | error |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        held = f"{r['node_held_out_pct']:+.1f}%" if r["node_held_out_pct"] is not None else "-"
        lines.append(
            f"| {r['size']} ({r['model_bytes'] / gib:.2f} GiB) | {r['strategy']} | "
            f"{'pass' if r['ok'] else 'FAIL'} | {r['node_measured'] / gib:.2f} GiB | "
            f"{r['node_predicted'] / gib:.2f} GiB | {r['node_error_pct']:+.1f}% | {held} | "
            f"{r['rank0_measured'] / gib:.2f} GiB | {r['rank0_predicted'] / gib:.2f} GiB | "
            f"{r['rank0_error_pct']:+.1f}% |")
    worst = max((abs(r["node_error_pct"]) for r in rows), default=0.0)
    held = [abs(r["node_held_out_pct"]) for r in rows if r["node_held_out_pct"] is not None]
    lines += ["", f"Largest node-total error: {worst:.1f}% (target: within 15%). \"held out\": "
              "the node total predicted by constants fitted on the other two sizes only (an "
              "extrapolation for the smallest and largest)"
              + (f"; largest {max(held):.1f}%." if held else ".")]
    return "\n".join(lines) + "\n"


# What each term scales with (smpcheck.memory.plan.FEATURES), by what the phase holds: a rank's
# shard where the weights are split, the whole model where every rank keeps a loaded copy (naive,
# accelerate's every-rank load, ZeRO-2's replicated parameters). At one world size the shard
# and the model are proportional, so that is a choice from how each strategy works, not a fit.
# Each term is then fitted as each of its candidates (features, with a constant or not: two
# numbers each, three sizes) and the one that best predicts each size from the other two is
# kept (_held_out_error) among those within INSIDE of every peak measured, fitted on all
# three: the init term's first candidate is smpcheck.memory's own share of the model
# (memory.rank_share).
WHOLE_COPY = {"naive", "accelerate-fsdp", "accelerate-fsdp1", "deepspeed-zero2"}
INSIDE = 0.14


def candidates(term: str, kind: str) -> list[tuple[tuple[str, ...], bool]]:
    """(features, with a constant) to try for ``term``; ``kind`` is shard or model."""
    if term == "init":
        return [(("share",), True), ((kind,), True), (("share", "unit"), False)]
    if term == "forward":
        return [(("model",), True), (("unit",), True), (("model", "unit"), False)]
    return [((kind,), True), ((kind, "unit"), False)]


def _anon_at(record: dict, t: float) -> int:
    """Anonymous RSS of the first sample at or after ``t``."""
    return next((s[1] for s in record["samples"] if s[0] >= t), record["samples"][-1][1])


def rank_measurement(record: dict) -> dict:
    """One rank's peaks above its baseline: init (load/transform/wrap), resident (when the
    check phase starts), check, forward (the whole phase's peak)."""
    base = record["baseline_anon"]
    phases = record["phases"]
    init = [p["peak_anon"] for p in phases if p["name"] in ("load", "transform", "wrap")]
    own = [p for p in phases if p["name"] in ("check", "forward")]
    out = {"baseline": base, "init": max(init, default=base) - base,
           "resident": (_anon_at(record, own[0]["start"]) if own else max(init)) - base}
    for name in ("check", "forward"):
        peaks = [p["peak_anon"] for p in phases if p["name"] == name]
        out[name] = max(peaks) - base if peaks else None
    out["all"] = max(p["peak_anon"] for p in phases) - base
    return out


def measurements(report_dir: Path, ckpt: Path, dtype: str) -> dict:
    """Every strategy's rank 0 and mean other rank, from the reports in ``report_dir``."""
    import torch

    from smpcheck.memory.plan import checkpoint_facts

    size, numel, itemsize = checkpoint_facts(ckpt, getattr(torch, dtype))
    out = {"model": {"total": size.total, "largest_unit": size.largest_unit,
                     "largest_tensor": size.largest_tensor, "params": numel},
           "strategies": {}}
    for path in sorted(report_dir.glob("smpcheck-*-tp*.json")):
        report = json.loads(path.read_text())
        name = report["environment"]["strategy"]
        ranks = sorted(report["memory"]["ranks"], key=lambda r: r["rank"])
        per_rank = [rank_measurement(r) for r in ranks]
        others = per_rank[1:] or per_rank
        mean = {k: (sum(r[k] for r in others) / len(others) if others[0][k] is not None
                    else None) for k in others[0]}
        ok = all(r["status"] in ("pass", "skip") for r in report["results"])
        out["strategies"][name] = {"ok": ok, "world": len(ranks), "rank0": per_rank[0],
                                   "others": mean, "per_rank": per_rank}
    return out


def _fit_term(columns: list[list[float]], const: bool, ys: list[float],
              peaks: list[float]) -> tuple[list[float], float, float]:
    """Least squares of ``ys`` on ``columns`` (and a constant), relative to each size's phase
    peak (every size counts alike); (coefficients, constant, largest error / peak)."""
    import numpy as np

    w = np.array([1 / max(abs(p), 2**20) for p in peaks])
    cols = [np.array(c) for c in columns] + ([np.ones(len(ys))] if const else [])
    a = np.stack(cols, 1) * w[:, None]
    solution, *_ = np.linalg.lstsq(a, np.array(ys) * w, rcond=None)
    coefs = [float(v) for v in solution[:len(columns)]]
    c = float(solution[-1]) if const else 0.0
    fitted = np.stack(cols, 1) @ solution
    worst = float(max(abs(f - y) * wi for f, y, wi in zip(fitted, ys, w)))
    return coefs, c, worst


def _held_out_error(columns: list[list[float]], const: bool, ys: list[float],
                    peaks: list[float]) -> float:
    """The largest error (relative to the peak) of predicting each size from a fit on the
    others: how a candidate extrapolates. A candidate is chosen by this, so that the one
    kept is the one that carries to sizes not measured, not the one that bends best through
    three points."""
    if len(ys) <= len(columns) + const:
        return 0.0
    worst = 0.0
    for i in range(len(ys)):
        keep = [j for j in range(len(ys)) if j != i]
        coefs, c, _ = _fit_term([[col[j] for j in keep] for col in columns], const,
                                [ys[j] for j in keep], [peaks[j] for j in keep])
        predicted = sum(a * col[i] for a, col in zip(coefs, columns)) + c
        worst = max(worst, abs(predicted - ys[i]) / max(abs(peaks[i]), 2**20))
    return worst


def fit_constants(measured: dict, features: dict | None = None) -> dict:
    """The constants of smpcheck.memory.plan from ``{size: measurements(...)}``: per strategy and
    rank (0, other) each term's best candidate. ``features`` (a fit's own ``strategies``)
    pins each term's features to that fit's choice (the held-out fits)."""
    from smpcheck.memory import ModelSize, rank_share
    from smpcheck.memory.plan import feature_bytes
    from smpcheck.run.plan_cli import strategy_facts

    sizes = list(measured.values())
    names = sorted(set.intersection(*(set(m["strategies"]) for m in sizes)))
    baselines = [r["baseline"] for m in sizes for s in m["strategies"].values()
                 for r in s["per_rank"]]
    fit = {"baseline_bytes": int(sum(baselines) / len(baselines)), "strategies": {}}

    def model(m: dict) -> ModelSize:
        return ModelSize(m["model"]["total"], m["model"]["largest_tensor"],
                         m["model"]["largest_unit"])

    for name in names:
        world = sizes[0]["strategies"][name]["world"]
        facts = strategy_facts([name], world)[0]
        kind = "model" if name in WHOLE_COPY else "shard"
        ranks = []
        for rank, key in ((0, "rank0"), (1, "others")):
            rows = [(model(m), m["strategies"][name][key]) for m in sizes]
            shares = [rank_share(facts.memory_strategy, s, rank, facts.sharded_over) * s.total
                      for s, _ in rows]
            resident = [r["resident"] for _, r in rows]
            targets = {
                "init": ([r["init"] for _, r in rows], [r["init"] for _, r in rows]),
                "resident": (resident, resident),
                "check": ([(r["check"] or 0) - r["resident"] for _, r in rows],
                          [r["check"] or r["resident"] for _, r in rows]),
                "forward": ([(r["forward"] or 0) - r["resident"] for _, r in rows],
                            [r["forward"] or r["resident"] for _, r in rows])}
            terms: dict = {"memory_strategy": facts.memory_strategy}
            for term, (ys, peaks) in targets.items():
                tried = candidates(term, kind)
                if features is not None:
                    pinned = features[name][rank][term]
                    tried = [(tuple(f for f in (pinned["feature"], pinned.get("feature2",
                              "none")) if f != "none"), pinned["const"] != 0)]
                best, best_score = None, None
                for feats, const in tried:
                    columns = [[share if f == "share" else
                                feature_bytes(f, s, facts.sharded_over)
                                for (s, _), share in zip(rows, shares)] for f in feats]
                    coefs, c, worst = _fit_term(columns, const, ys, peaks)
                    # within INSIDE of each peak measured, the one that extrapolates best
                    score = (max(worst, INSIDE), _held_out_error(columns, const, ys, peaks),
                             worst)
                    if best is None or score < best_score:
                        best_score = score
                        best = {"feature": feats[0], "x": coefs[0],
                                "feature2": feats[1] if len(feats) > 1 else "none",
                                "x2": coefs[1] if len(feats) > 1 else 0.0,
                                "const": c, "worst": worst}
                terms[term] = best
            ranks.append(terms)
        fit["strategies"][name] = ranks
    return fit


def held_out_plan(ckpt: Path, here: dict, others: dict, dtype: str,
                  features: dict) -> dict[str, int]:
    """The node peak of each strategy for this size, predicted by constants fitted on the
    OTHER sizes only (each term's feature as the shipped fit chose it): how well the model
    extrapolates, not how well it interpolates."""
    import torch

    from smpcheck.memory.plan import checkpoint_facts, plan
    from smpcheck.run.plan_cli import strategy_facts
    fit = fit_constants(others, features)
    size, numel, itemsize = checkpoint_facts(ckpt, getattr(torch, dtype))
    names = [n for n in here["strategies"] if n in fit["strategies"]]
    world = next(iter(here["strategies"].values()))["world"]
    out = plan(size, numel, itemsize, strategy_facts(names, world), nproc_per_node=world,
               fit=fit)
    return {r["name"]: r["node_peak_bytes"] for r in out["strategies"]}


def write_fit(fit: dict, path: Path, provenance: str) -> None:
    """smpcheck/memory/plan_fit.py: the constants, with where they came from."""
    import pprint

    def rounded(value):
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return round(value, 4) if isinstance(value, float) else value

    body = pprint.pformat(rounded(fit), width=100, sort_dicts=False)
    path.write_text(
        '"""The constants of ``smpcheck plan`` (:mod:`smpcheck.memory.plan`), fitted from '
        'measurements.\n\nWritten by ``benchmarks/plan_calibration.py --fit``: do not edit by '
        'hand, rerun it.\nPer strategy, [rank 0, any other rank], per term (smpcheck.memory.plan.'
        'Term): ``x * feature +\nx2 * feature2 + const`` bytes, the features as '
        'smpcheck.memory.plan.FEATURES (``share``: the bound\'s\nshare of the model for the rank, '
        'memory.rank_share); ``worst`` is the largest error of that\nterm, relative to the '
        'phase\'s peak, over the sizes fitted. ``forward`` is the forward\nphase\'s extra '
        'above ``resident``: what a change to the forward check\'s unsharding moves.\n'
        '"""\n\n'
        f"PROVENANCE = {pprint.pformat(provenance, width=80)}\n\nFIT: dict = {body}\n")


def validation(args: argparse.Namespace, measured_elsewhere: Path) -> list[dict]:
    """Measure (unless --reuse) ``--validate``'s size on its own world size, and compare
    the plan with it: rows as in the calibration table."""
    size, nproc = args.validate.split(":")
    nproc = int(nproc)
    params, hidden, vocab = SIZES[size]
    ckpt = args.workdir / f"llama-{size}"
    write_checkpoint(ckpt, params, hidden, vocab)
    if not args.reuse:
        strategies = args.strategies.split(",") if args.strategies else available_strategies()
        report_dir = args.workdir / f"v{nproc}-{size}"
        measure(ckpt, strategies, nproc, args.dtype, report_dir)
        measured_elsewhere.write_text(json.dumps(
            {"size": size, "nproc": nproc, "commit": head(),
             **measurements(report_dir, ckpt, args.dtype)},
            indent=1) + "\n")
    data = json.loads(measured_elsewhere.read_text())
    plan = {s["name"]: s for s in plan_for(ckpt, nproc, args.dtype)["strategies"]}
    rows = []
    for name, m in data["strategies"].items():
        node = sum(r["all"] for r in m["per_rank"])
        rank0 = m["rank0"]["all"]
        predicted = plan[name]
        rows.append({
            "size": f"{size}, {nproc} ranks", "nproc": nproc, "strategy": name, "ok": m["ok"],
            "model_bytes": data["model"]["total"], "node_measured": node,
            "node_predicted": predicted["node_peak_bytes"],
            "node_error_pct": 100 * (predicted["node_peak_bytes"] - node) / node,
            "rank0_measured": rank0, "rank0_predicted": predicted["rank0_peak_bytes"],
            "rank0_error_pct": 100 * (predicted["rank0_peak_bytes"] - rank0) / rank0,
            "peak_phase_predicted": predicted["peak_phase"], "node_held_out_pct": None})
    return rows


def moved(before: dict, after: dict) -> str:
    """Markdown: each strategy's whole-run node total and forward extra (per non-zero rank,
    above what it holds after init) in two sets of measurements (before and after a change
    to the forward phase): which numbers a recalibration moves."""
    gib, mib = 2**30, 2**20
    lines = [f"Measured at {next(iter(before.values())).get('commit', '?')} (before) and "
             f"{next(iter(after.values())).get('commit', '?')} (after).", "",
             "| model | strategy | node total before | after | change | forward extra per "
             "rank before | after |", "|---|---|---:|---:|---:|---:|---:|"]
    for size in before:
        if size not in after:
            continue
        for name in sorted(set(before[size]["strategies"]) & set(after[size]["strategies"])):
            a, b = before[size]["strategies"][name], after[size]["strategies"][name]
            na, nb = (sum(r["all"] for r in m["per_rank"]) for m in (a, b))
            fa, fb = ((m["others"]["forward"] or 0) - m["others"]["resident"] for m in (a, b))
            lines.append(f"| {size} | {name} | {na / gib:.2f} GiB | {nb / gib:.2f} GiB | "
                         f"{100 * (nb - na) / na:+.0f}% | {fa / mib:.0f} MiB | "
                         f"{fb / mib:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--strategies", default=None, help="default: all that run here")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smpcheck-plan-calibration"))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/plan-calibration")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the measurements in --out; refit and recompute the plan")
    parser.add_argument("--fit", action="store_true",
                        help="refit smpcheck/memory/plan_fit.py from the measurements first")
    parser.add_argument("--validate", default="1e8:2",
                        help="SIZE:NPROC measured too and never fitted on: how the plan carries "
                        "to another world size (empty: none)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kept = args.out / "measurements.json"
    measured = json.loads(kept.read_text()) if kept.exists() else {}
    sizes = args.sizes.split(",")
    if not args.reuse:
        strategies = args.strategies.split(",") if args.strategies else available_strategies()
        for size in sizes:
            params, hidden, vocab = SIZES[size]
            ckpt = args.workdir / f"llama-{size}"
            write_checkpoint(ckpt, params, hidden, vocab)
            print(f"{size}: compare {','.join(strategies)} on {args.nproc} ranks", flush=True)
            report_dir = args.workdir / f"r-{size}"
            measure(ckpt, strategies, args.nproc, args.dtype, report_dir)
            comparison(report_dir, args.out, size)
            measured[size] = {"nproc": args.nproc, "dtype": args.dtype, "commit": head(),
                              **measurements(report_dir, ckpt, args.dtype)}
            kept.write_text(json.dumps(measured, indent=1) + "\n")
    shipped = None
    if args.fit:
        commit = ", ".join(sorted({measured[s].get("commit", "?") for s in sizes}))
        fit = fit_constants({s: measured[s] for s in sizes})
        shipped = fit["strategies"]
        write_fit(fit, ROOT / "smpcheck/memory/plan_fit.py",
                  f"benchmarks/plan_calibration.py on {time.strftime('%Y-%m-%d')}, commit "
                  f"{commit or '?'}: synthetic Llama {', '.join(sizes)} params, "
                  f"{args.nproc} CPU ranks (gloo, {os.cpu_count()} cores), --dtype {args.dtype}")
    rows = []
    for size in sizes:
        params, hidden, vocab = SIZES[size]
        ckpt = args.workdir / f"llama-{size}"
        write_checkpoint(ckpt, params, hidden, vocab)
        plan = {s["name"]: s for s in plan_for(ckpt, args.nproc, args.dtype)["strategies"]}
        others = [s for s in sizes if s != size]
        if shipped is None:
            from smpcheck.memory.plan_fit import FIT

            shipped = FIT["strategies"]
        held_out = held_out_plan(ckpt, measured[size], {s: measured[s] for s in others},
                                 args.dtype, shipped) if len(others) >= 2 else {}
        for name, m in measured[size]["strategies"].items():
            node = m["rank0"]["all"] + sum(r["all"] for r in m["per_rank"][1:])
            rank0 = m["rank0"]["all"]
            predicted = plan[name]
            rows.append({
                "size": size, "strategy": name, "ok": m["ok"],
                "model_bytes": measured[size]["model"]["total"], "node_measured": node,
                "node_predicted": predicted["node_peak_bytes"],
                "node_error_pct": 100 * (predicted["node_peak_bytes"] - node) / node,
                "rank0_measured": rank0, "rank0_predicted": predicted["rank0_peak_bytes"],
                "rank0_error_pct": 100 * (predicted["rank0_peak_bytes"] - rank0) / rank0,
                "peak_phase_predicted": predicted["peak_phase"],
                "node_held_out_pct": (100 * (held_out[name] - node) / node
                                      if name in held_out else None)})
    text = table(rows, args.nproc, args.dtype)
    if args.validate:
        checked = validation(args, measured_elsewhere=args.out / "validation.json")
        rows += checked
        text += ("\nValidation, never fitted on: the same plan for another world size.\n\n"
                 + table(checked, checked[0]["nproc"], args.dtype).split("\n", 2)[2])
    (args.out / "table.md").write_text(text)
    before = args.out / "before-forward-fix" / "measurements.json"
    if before.exists():  # the forward phase's fix, measured on both sides
        (before.parent / "moved.md").write_text(moved(json.loads(before.read_text()), measured))
    (args.out / "calibration.json").write_text(json.dumps(
        {"nproc": args.nproc, "dtype": args.dtype, "rows": rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
