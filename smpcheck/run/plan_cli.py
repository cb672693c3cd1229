"""``smpcheck plan MODEL --nproc-per-node N``: the CLI of :mod:`smpcheck.memory.plan`, apart from it
so that the prediction itself never imports the strategies (which import the recipes): this
module turns each strategy class into the facts the prediction needs.

    smpcheck plan /ckpt/llama --nproc-per-node 8
    smpcheck plan /ckpt/llama --nproc-per-node 8 --nnodes 2 --dtype bfloat16 --node-memory 1.5TiB
    smpcheck plan /ckpt/llama --nproc-per-node 8 --strategy fsdp2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smpcheck.checkpoint.source import UsageError

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``plan``'s sub-parser, on ``smpcheck``'s sub-parsers."""
    plan = subparsers.add_parser(
        "plan", help="predict each strategy's host memory on this node before loading anything")
    plan.add_argument("model", nargs="?", help="checkpoint directory or cached hub id "
                      "(default: the built-in demo model)")
    plan.add_argument("--nproc-per-node", type=int, default=2,
                      help="ranks per node (default 2)")
    plan.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--strategy", default="all",
                      help="one strategy, a comma-separated list, or all (default)")
    plan.add_argument("--dtype", choices=DTYPES, default=None,
                      help="the dtype the run loads in (default: the checkpoint's)")
    plan.add_argument("--node-memory", default=None, metavar="BYTES",
                      help="memory a node has for the job: bytes or e.g. 512G, 1.5TiB "
                      "(default: this node's MemAvailable)")
    plan.add_argument("--skip", action="append", default=[], metavar="PHASE",
                      help="a phase the run will not have: forward (run --skip forward) or check")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    return plan


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 onto 2 inside the block: a library's logging handler holds the
    original ``sys.stdout``, so only the descriptor can be moved."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def strategy_facts(names: list[str], world: int) -> list[Any]:
    """:class:`smpcheck.memory.plan.StrategyFacts` of the named strategies on ``world`` ranks."""
    from smpcheck.memory.plan import StrategyFacts
    from smpcheck.strategies import STRATEGIES

    out = []
    for name in names:
        cls = STRATEGIES[name]
        tp = cls.tp_degree(1, world)
        out.append(StrategyFacts(
            name=name, memory_strategy=cls.memory_strategy,
            sharded_over=cls.sharded_over(world, tp),
            replicated_params=getattr(cls, "stage", 3) == 2, unavailable=cls().unavailable()))
    return out


def _names(text: str) -> list[str]:
    from smpcheck.strategies import STRATEGIES

    if text.strip() == "all":
        return list(STRATEGIES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise UsageError(f"--strategy {text!r}: choose all or from {', '.join(STRATEGIES)}")
    return names


def _skipped(values: list[str]) -> tuple[str, ...]:
    """Phases not run: ``forward`` (as ``smpcheck run --skip forward``) or ``check``."""
    phases = {p.strip() for v in values for p in v.split(",") if p.strip()}
    unknown = sorted(phases - {"forward", "check"})
    if unknown:
        raise UsageError(f"--skip {','.join(unknown)}: plan skips phases, forward or check")
    return tuple(sorted(phases))


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The plan ``args`` ask for, or a :class:`UsageError`."""
    import torch

    from smpcheck.checkpoint import CheckpointError
    from smpcheck.checkpoint.inputs import validate
    from smpcheck.checkpoint.source import resolve
    from smpcheck.memory.plan import checkpoint_facts, node_memory_here, parse_bytes, plan

    for flag in ("nproc_per_node", "nnodes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, flag)}")
    here = node_memory_here()
    if args.node_memory is not None:
        try:
            budget = parse_bytes(args.node_memory)
        except ValueError as exc:
            raise UsageError(f"--node-memory: {exc}") from None
        source_of_budget = "--node-memory"
    else:
        budget = here.get("MemAvailable")
        source_of_budget = "MemAvailable"
    names = _names(args.strategy)
    source = resolve(args.model)
    validate(source.path)  # config.json and the headers, each problem one sentence
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        size, numel, itemsize = checkpoint_facts(source.path, dtype)
    except (CheckpointError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    world = args.nproc_per_node * args.nnodes
    out = plan(size, numel, itemsize, strategy_facts(names, world),
               nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_memory=budget,
               skip=_skipped(args.skip))
    return {**out, "model": source.name, "model_path": str(source.path),
            "dtype": args.dtype or "as stored", "node_memory_source": source_of_budget,
            "mem_total_bytes": here.get("MemTotal"),
            "mem_available_bytes": here.get("MemAvailable")}


def plan_for_run(model_path: str, world: int, model_bytes: int, names: list[str],
                 skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The plan of a run that happened (``smpcheck compare``'s reports: one node of
    ``world`` ranks, loaded to ``model_bytes``), by strategy, with the node memory left out.
    The loaded dtype is the one whose size matches ``model_bytes`` (as stored otherwise)."""
    import torch

    from smpcheck.memory.plan import checkpoint_facts, plan
    from smpcheck.strategies import STRATEGIES

    dtype = None
    stored, numel, _ = checkpoint_facts(Path(model_path))
    if model_bytes and numel and model_bytes != stored.total:
        dtype = {4: torch.float32, 2: torch.bfloat16}.get(round(model_bytes / numel))
    size, numel, itemsize = checkpoint_facts(Path(model_path), dtype)
    known = [n for n in names if n in STRATEGIES]
    out = plan(size, numel, itemsize, strategy_facts(known, world), nproc_per_node=world,
               skip=skip)
    return {row["name"]: row for row in out["strategies"]}


def text(data: dict[str, Any]) -> str:
    """A small table and the recommendation."""
    from smpcheck.report.units import human_bytes as h

    rows = data["strategies"]
    width = max([8, *(len(r["name"]) for r in rows)])
    lines = [f"{data['model']}: {data['params'] / 1e9:.2f} B parameters, "
             f"{h(data['model_bytes'])} as loaded ({data['dtype']}), {data['nproc_per_node']} "
             f"ranks x {data['nnodes']} node(s); node memory {h(data['node_memory_bytes'] or 0)} "
             f"({data['node_memory_source']})",
             f"{'strategy':{width}} {'node peak':>10} {'rank peak':>10} {'in':>8} "
             f"{'node need':>10} {'fits':>5} {'device/rank':>12}  note"]
    for r in rows:
        lines.append(f"{r['name']:{width}} {h(r['node_peak_bytes']):>10} "
                     f"{h(r['rank_peak_bytes']):>10} {r['peak_phase']:>8} "
                     f"{h(r['node_need_bytes']):>10} {'yes' if r['fits'] else 'NO':>5} "
                     f"{h(r['device_total_bytes']):>12}  "
                     f"{'' if r['available'] else 'cannot run here'}")
    lines += ["(peaks: anonymous host memory above the ranks' idle baseline over the whole "
              "smpcheck run; node need adds the idle ranks; device/rank: parameters, gradients "
              "and Adam state per rank)", data["recommendation"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the plan; 0 when a strategy fits, 1 when none does. Whatever the libraries
    print while the plan is made (DeepSpeed announces its accelerator on stdout) goes to
    stderr, so ``--json`` output parses."""
    with _stdout_to_stderr():
        data = build(args)
    print(json.dumps(data, indent=2) if args.json else text(data))
    return 0 if data["recommended"] else 1


def predicted(reports: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``smpcheck plan`` for the compared reports' model, world and loaded dtype (one node:
    compare self-launches), by strategy, to show beside what each run measured; empty, and
    said, where it cannot be computed (a model no longer on disk, a strategy the plan was
    never calibrated for)."""
    if not reports:
        return {}
    env = next(iter(reports.values())).environment
    try:
        forward = any(p["name"] == "forward" for r in reports.values()
                      for rec in r.memory.get("ranks", [])[:1] for p in rec["phases"])
        return plan_for_run(env["model_path"], int(env["world_size"]),
                            int(env.get("model_bytes") or 0), list(reports),
                            skip=() if forward else ("forward",))
    except Exception as exc:  # noqa: BLE001 - the comparison stands without the prediction
        print(f"[smpcheck] no plan beside the comparison: {type(exc).__name__}: {exc}")
        return {}
