"""The ``accelerate-fsdp`` strategy's host memory on two transformers releases: 4.57.x (the last
4.x) and the installed 5.x, on the same checkpoint, ranks and dtype.

Whether accelerate's ``cpu_ram_efficient_loading`` still loads on rank 0 only is a property of
the installed transformers (the strategy probes it on every rank: "loading_verdict"); this
script puts the two releases' per-rank and node-total peaks side by side, for the strategy's
own phases (load, wrap) and for the whole ``smpcheck run`` (check and forward too).

The 4.57 interpreter is a separate venv holding only smpcheck's dependencies; smpcheck itself
is imported from ``--code`` (default this checkout) through PYTHONPATH:

    python -m venv /tmp/v457 && /tmp/v457/bin/pip install -c constraints/cpu.txt \\
        torch==2.13.0 'transformers==4.57.*' accelerate safetensors psutil xxhash jinja2 \\
        matplotlib packaging
    python benchmarks/accelerate_releases.py --pythons .venv/bin/python,/tmp/v457/bin/python

Results: ``benchmarks/results/accelerate-releases/`` (``table.md``, ``results.json``, each
run's report).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan_calibration import SIZES, write_checkpoint  # noqa: E402

MIB = 2**20


def version_of(python: str, code: Path) -> str:
    done = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(code)})
    return done.stdout.strip()


def run(python: str, code: Path, ckpt: Path, strategy: str, nproc: int, dtype: str,
        out: Path) -> dict:
    """One ``smpcheck run``; the peaks of its report (MiB above each rank's baseline)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [python, "-m", "smpcheck", "run", str(ckpt), "--strategy", strategy,
               "--nproc-per-node", str(nproc), "--oversubscribe", "--dtype", dtype,
               "--report-dir", str(out), "--timeout", "3000"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd="/tmp",
                          env={**os.environ, "PYTHONPATH": str(code), "DS_ACCELERATOR": "cpu"})
    (out / "run.log").write_text(done.stdout + done.stderr)
    report = json.loads((out / f"smpcheck-{strategy}-tp1.json").read_text())
    ranks = sorted(report["memory"]["ranks"], key=lambda r: r["rank"])
    own, whole = [], []
    for record in ranks:
        base = record["baseline_anon"]
        phases = record["phases"]
        own.append(max(p["peak_anon"] for p in phases if p["name"] in ("load", "wrap")) - base)
        whole.append(max(p["peak_anon"] for p in phases) - base)
    env = report["environment"]
    return {"exit_code": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "model_bytes": env["model_bytes"], "transformers": env.get("transformers"),
            "loading_verdict": env.get("loading_verdict", ""),
            "per_rank_mib": [round(b / MIB) for b in own],
            "node_total_mib": round(sum(own) / MIB),
            "per_rank_whole_run_mib": [round(b / MIB) for b in whole],
            "node_total_whole_run_mib": round(sum(whole) / MIB),
            "checks": {r["name"]: r["status"] for r in report["results"]}}


def table(rows: list[dict], nproc: int, dtype: str, size: str) -> str:
    lines = [f"`accelerate-fsdp` (FSDP2 plugin, `cpu_ram_efficient_loading`), synthetic Llama "
             f"{size} params, {nproc} CPU ranks, `--dtype {dtype}`; anonymous RSS above each "
             "rank's idle baseline.", "",
             "| transformers | load+wrap per rank (MiB) | node total | × model | whole run per "
             "rank (MiB) | node total | × model | loading |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        model = r["model_bytes"] / MIB
        lines.append(
            f"| {r['transformers']} | {', '.join(map(str, r['per_rank_mib']))} | "
            f"{r['node_total_mib']} | {r['node_total_mib'] / model:.2f} | "
            f"{', '.join(map(str, r['per_rank_whole_run_mib']))} | "
            f"{r['node_total_whole_run_mib']} | {r['node_total_whole_run_mib'] / model:.2f} | "
            f"{r['loading_verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pythons", default=f"{sys.executable},/tmp/v457/bin/python")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="the smpcheck source every interpreter imports")
    parser.add_argument("--size", default="1e8", choices=sorted(SIZES))
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--strategy", default="accelerate-fsdp")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smpcheck-plan-calibration"))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/accelerate-releases")
    args = parser.parse_args()
    params, hidden, vocab = SIZES[args.size]
    ckpt = args.workdir / f"llama-{args.size}"
    write_checkpoint(ckpt, params, hidden, vocab)
    rows = []
    for python in args.pythons.split(","):
        version = version_of(python, args.code)
        print(f"transformers {version} ({python})", flush=True)
        row = run(python, args.code, ckpt, args.strategy, args.nproc, args.dtype,
                  args.out / f"transformers-{version}")
        rows.append({"python": python, **row})
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"size": args.size, "nproc": args.nproc, "dtype": args.dtype, "rows": rows},
        indent=2) + "\n")
    text = table(rows, args.nproc, args.dtype, args.size)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
