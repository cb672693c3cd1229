"""``smpcheck plan``: will this job fit this node's host memory, and with which strategy, said
from the checkpoint's headers and config.json before anything is loaded.

Why a prediction, and what it predicts: a run that does not fit is killed by the OOM killer
minutes into loading, after the allocation was spent. The figure predicted is the one
``smpcheck compare`` measures: anonymous RSS above each rank's idle baseline (torch, the
device and the communicator initialised), at its peak over the WHOLE ``smpcheck run``, i.e.
the strategy's load, transform and wrap and smpcheck's own check and forward phases, summed
over a node's ranks (an upper bound of the simultaneous total).

The model, per strategy and per rank (rank 0, or any other), from the model's bytes in the
loaded dtype (``ModelSize``: the whole, the largest FSDP unit) and the ranks the weights are
split over:

* init (load, transform, wrap): smpcheck.memory's own per-strategy row first (``share``:
  :func:`memory.rank_share`, the model the run's memory bound uses), scaled and offset;
* after init a rank holds ``resident`` (its shards, a loaded copy some strategies keep, an
  optimizer's state);
* the check phase adds ``check`` above that (expected values read one tensor at a time);
* the forward phase adds ``forward`` above that: a separate, named term
  (:data:`FORWARD_EXTRA`), because it is what changes when the forward's unsharding changes
  (before 8ab4e3b, FSDP2's root unit stayed unsharded after an inference forward);

and the rank's peak is the largest of the three. Each term is ``x * feature [+ x2 * feature2]
[+ const]`` (:class:`Term`): a rank's shard where the strategy splits the weights, the whole
model where every rank keeps a copy (a choice from how the strategy works: at one world size
the two are proportional), the largest unit, or smpcheck.memory's share. Among a few such
candidates per term, ``benchmarks/plan_calibration.py`` keeps the one that best predicts each
measured size from the others, fits it on all (3 sizes x 4 ranks, CPU, float32 loads) and
writes :mod:`smpcheck.memory.plan_fit`; a rerun of that script after a change to what a phase costs
is all a recalibration takes. Loads in a checkpoint's own dtype are memory-mapped by
transformers 5 (file-backed, not anonymous): there the plan, calibrated on owned float32
weights, is an upper bound.

Device memory for training (parameters, gradients, Adam: two fp32 states, plus fp32 masters
where the parameters are in lower precision) is stated per rank under each strategy's
sharding, from the parameter count alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smpcheck.memory import ModelSize, rank_share
from smpcheck.memory.plan_fit import FIT, PROVENANCE

PHASES = ("init", "check", "forward")
# what a term scales with: the whole model, a rank's shard of it, the largest FSDP unit, and
# (init only) smpcheck.memory's share of the model for the rank (memory.rank_share x the model)
FEATURES = ("model", "shard", "unit", "share", "none")


@dataclass(frozen=True)
class StrategyFacts:
    """What the prediction needs to know of a strategy (the class attributes the job and the
    memory bound ask it about), so that the prediction never imports the recipes."""

    name: str
    memory_strategy: str  # its row of memory._holds
    sharded_over: int  # ranks the weights are split over on this world
    replicated_params: bool = False  # every rank keeps the whole parameters (ZeRO-2)
    unavailable: str | None = None  # why it cannot run here, or None


@dataclass(frozen=True)
class Term:
    """``x * feature + x2 * feature2 + const`` bytes, each feature one of :data:`FEATURES`."""

    feature: str = "none"
    x: float = 0.0
    const: float = 0.0
    feature2: str = "none"
    x2: float = 0.0
    worst: float = 0.0  # the fit's largest error over the sizes measured, relative to the peak

    def bytes(self, features: dict[str, float]) -> float:
        return self.x * features[self.feature] + self.x2 * features[self.feature2] + self.const


def feature_bytes(feature: str, size: ModelSize, sharded_over: int) -> float:
    """The bytes a term scales with: the whole model, one rank's shard, the largest unit."""
    return {"model": size.total, "shard": size.total / sharded_over,
            "unit": size.largest_unit, "none": 0.0}[feature]  # "share": see predict_rank


@dataclass(frozen=True)
class RankModel:
    """One rank's terms: the init phase's peak, what it holds after init (``resident``), and
    what the check and forward phases add above that."""

    init: Term
    resident: Term
    check: Term
    forward: Term
    memory_strategy: str = ""  # the memory._holds row its ``share`` feature was fitted with

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankModel:
        """From one rank's entry of :data:`smpcheck.memory.plan_fit.FIT` (other keys ignored)."""
        return cls(**{k: Term(**data[k]) for k in ("init", "resident", "check", "forward")},
                   memory_strategy=data.get("memory_strategy", ""))


# The forward phase's extra above what a rank holds after init, by strategy and rank
# (rank 0, others): named apart so that a change to the forward check's unsharding moves these
# numbers only (benchmarks/plan_calibration.py refits them).
FORWARD_EXTRA: dict[str, tuple[Term, Term]] = {
    name: (RankModel.from_dict(ranks[0]).forward, RankModel.from_dict(ranks[1]).forward)
    for name, ranks in FIT["strategies"].items()}


@dataclass
class RankPrediction:
    """One rank's predicted peak above its idle baseline, by phase, and its device memory."""

    peak_bytes: int
    phases: dict[str, int]
    phase: str  # the phase of the peak


@dataclass
class StrategyPlan:
    """One strategy's prediction for one node (the node that holds rank 0)."""

    name: str
    node_peak_bytes: int  # sum of the node's ranks' peaks above idle
    rank_peak_bytes: int  # the largest rank's peak above idle
    rank0_peak_bytes: int
    other_rank_peak_bytes: int
    peak_phase: str  # where the node's largest rank peaks (init, check or forward)
    node_need_bytes: int  # node_peak_bytes + the ranks' idle baselines
    device_params_bytes: int  # per rank
    device_grads_bytes: int
    device_optimizer_bytes: int
    device_total_bytes: int
    fits: bool
    available: bool
    unavailable: str | None
    phases_rank0: dict[str, int] = field(default_factory=dict)
    phases_other: dict[str, int] = field(default_factory=dict)


def model_for(memory_strategy: str, name: str,
              fit: dict[str, Any] | None = None) -> tuple[RankModel, RankModel]:
    """The fitted terms of a strategy (by its name, else by its memory row: SageMaker's SMP
    follows our SMP recipe's row and was never measured here), from ``fit`` (default the
    shipped :data:`smpcheck.memory.plan_fit.FIT`)."""
    strategies = (fit or FIT)["strategies"]
    key = name if name in strategies else next(
        (n for n, s in strategies.items() if s[0].get("memory_strategy") == memory_strategy),
        None)
    if key is None:
        raise ValueError(f"no calibrated plan for strategy {name!r}")
    ranks = strategies[key]
    return RankModel.from_dict(ranks[0]), RankModel.from_dict(ranks[1])


def predict_rank(model: RankModel, facts: StrategyFacts, size: ModelSize, rank: int,
                 skip: Iterable[str] = ()) -> RankPrediction:
    """One rank's peak above idle: the largest of init, resident + check and resident +
    forward (a phase in ``skip`` is not run, as ``smpcheck run --skip forward``)."""
    features = {f: feature_bytes(f, size, facts.sharded_over) for f in FEATURES
                if f != "share"}
    # The share as fitted: a memory row changed since (a bound corrected) moves the bound at
    # once, and the plan only when benchmarks/plan_calibration.py --fit measures it again.
    features["share"] = rank_share(model.memory_strategy or facts.memory_strategy, size, rank,
                                   facts.sharded_over) * size.total
    resident = model.resident.bytes(features)
    phases = {"init": model.init.bytes(features), "check": resident + model.check.bytes(features),
              "forward": resident + model.forward.bytes(features)}
    phases = {k: int(max(0.0, v)) for k, v in phases.items() if k not in skip}
    phase = max(phases, key=phases.__getitem__)
    return RankPrediction(phases[phase], phases, phase)


def device_bytes(facts: StrategyFacts, numel: int, itemsize: int) -> dict[str, int]:
    """Per-rank training memory under the strategy's sharding: parameters and gradients in
    the parameters' dtype, Adam's two fp32 states, and fp32 masters where the parameters are
    in lower precision. Replicated parameters (ZeRO-2) are whole on every rank; gradients and
    optimizer state are partitioned by every strategy here."""
    shard = facts.sharded_over
    params = numel * itemsize // (1 if facts.replicated_params else shard)
    grads = numel * itemsize // shard
    optimizer = numel * (8 + (4 if itemsize < 4 else 0)) // shard
    return {"params": params, "grads": grads, "optimizer": optimizer,
            "total": params + grads + optimizer}


def plan(size: ModelSize, numel: int, itemsize: int, strategies: list[StrategyFacts], *,
         nproc_per_node: int, nnodes: int = 1, node_memory: int | None = None,
         skip: Iterable[str] = (), fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan for every strategy, and the one recommended.

    Args:
        size: the model's bytes in the loaded dtype (``Checkpoint.sizes(dtype)``).
        numel, itemsize: parameter count, and bytes per parameter as loaded.
        strategies: what each strategy is (its ``sharded_over`` for this world).
        nproc_per_node, nnodes: the job's shape; the node planned is rank 0's (the fullest).
        node_memory: bytes a node has for the job (None: the prediction only, ``fits`` True).
        skip: phases not run.
        fit: the constants (default the shipped ones; the calibration passes its own).

    Returns:
        ``{"strategies": [StrategyPlan as dicts], "recommended": name or None, ...}``.
    """
    skip = tuple(skip)
    rows = []
    baseline = int((fit or FIT)["baseline_bytes"])
    for facts in strategies:
        rank0_model, other_model = model_for(facts.memory_strategy, facts.name, fit)
        rank0 = predict_rank(rank0_model, facts, size, 0, skip)
        other = predict_rank(other_model, facts, size, 1, skip)
        node = rank0.peak_bytes + (nproc_per_node - 1) * other.peak_bytes
        need = node + nproc_per_node * baseline
        device = device_bytes(facts, numel, itemsize)
        top = rank0 if rank0.peak_bytes >= other.peak_bytes or nproc_per_node == 1 else other
        rows.append(StrategyPlan(
            name=facts.name, node_peak_bytes=node,
            rank_peak_bytes=top.peak_bytes, rank0_peak_bytes=rank0.peak_bytes,
            other_rank_peak_bytes=other.peak_bytes if nproc_per_node * nnodes > 1 else 0,
            peak_phase=top.phase, node_need_bytes=need,
            device_params_bytes=device["params"], device_grads_bytes=device["grads"],
            device_optimizer_bytes=device["optimizer"], device_total_bytes=device["total"],
            fits=node_memory is None or need <= node_memory,
            available=facts.unavailable is None, unavailable=facts.unavailable,
            phases_rank0=rank0.phases, phases_other=other.phases))
    best = recommend(rows)
    return {"strategies": [asdict(r) for r in rows],
            "recommended": best.name if best else None,
            "recommendation": recommendation(rows, best, node_memory),
            "model_bytes": size.total, "params": numel, "bytes_per_param": itemsize,
            "nproc_per_node": nproc_per_node, "nnodes": nnodes,
            "world_size": nproc_per_node * nnodes, "node_memory_bytes": node_memory,
            "baseline_bytes_per_rank": baseline,
            "calibration": PROVENANCE if fit is None else "given"}


def recommend(rows: list[StrategyPlan]) -> StrategyPlan | None:
    """The fitting strategy with the lowest node peak, among those that can run here first."""
    fitting = [r for r in rows if r.fits]
    pool = [r for r in fitting if r.available] or fitting
    return min(pool, key=lambda r: r.node_peak_bytes, default=None)


def recommendation(rows: list[StrategyPlan], best: StrategyPlan | None,
                   node_memory: int | None) -> str:
    """One sentence: what to run, or why nothing fits."""
    from smpcheck.report.units import human_bytes

    if not rows:
        return "No strategy to plan for."
    if best is None:
        least = min(rows, key=lambda r: r.node_need_bytes)
        return (f"No strategy fits: the least, {least.name}, needs about "
                f"{human_bytes(least.node_need_bytes)} on rank 0's node (idle ranks included) "
                f"and the node has {human_bytes(node_memory or 0)}; use more nodes or fewer "
                "ranks per node.")
    where = "" if node_memory is None else f" of the node's {human_bytes(node_memory)}"
    note = "" if best.available else f" (it cannot run here: {best.unavailable})"
    return (f"Use --strategy {best.name}: the lowest predicted node peak that fits, "
            f"{human_bytes(best.node_peak_bytes)} above idle, about "
            f"{human_bytes(best.node_need_bytes)} with the idle ranks{where}, peaking in its "
            f"{best.peak_phase} phase{note}.")


# -- sizes and memory ---------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``512G``, ``1.5TiB``, ``64GB``, ``1000000``: a size in bytes. Single letters (K, M, G,
    T) are binary as ``free -g`` and Slurm's ``--mem`` read them; ``GB`` is decimal and
    ``GiB`` binary, as written.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*",
                         text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write bytes or e.g. 512G, 64GB, 1.5TiB")
    number, prefix, binary, unit_b = match.groups()
    prefix = prefix.lower()
    if prefix and not binary and not unit_b:
        key = prefix + "i"  # 512G: binary
    else:
        key = prefix + binary
    value = float(number) * _UNITS[key]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def node_memory_here(meminfo: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """MemTotal and MemAvailable of this node, in bytes (empty where there is no meminfo)."""
    out = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def checkpoint_facts(path: Path, dtype: Any = None) -> tuple[ModelSize, int, int]:
    """(sizes in the loaded dtype, parameter count, bytes per parameter as loaded), from the
    safetensors headers alone (or DCP's metadata): no tensor is read."""
    import torch

    from smpcheck.checkpoint.dcp import open_checkpoint

    checkpoint = open_checkpoint(path)
    size = checkpoint.sizes(dtype)
    numel = checkpoint.sizes(torch.uint8).total  # one byte per element: the element count
    itemsize = dtype.itemsize if dtype is not None else max(1, round(size.total / (numel or 1)))
    return size, numel, itemsize
