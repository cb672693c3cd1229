"""What every check shares: the context it reads, the protocol it follows, and the merging
of per-rank results into one verdict that every rank holds.

A check runs in two halves. ``run`` is the rank-local part plus any collectives the check
needs itself (the same on every rank, in the same order); it returns this rank's
:class:`CheckResult`. :func:`gather_result` then all-gathers those results (small objects:
sentences, never tensors) and merges them, so a fault seen only on rank 5 fails rank 0's
report too.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from smpcheck.checkpoint import Checkpoint
from smpcheck.pieces import Piece, iter_pieces, unwrap
from smpcheck.report.model import CheckResult, Finding, Status


@dataclass
class CheckContext:
    """Everything a check may read. Checks never build or change a model."""

    model: nn.Module
    checkpoint: Path | None = None
    dense_model: nn.Module | None = None
    process_group: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    gathers_done: int = 0  # all_gathers the running check has made (see run_check)

    def __post_init__(self) -> None:
        # DDP (what accelerate's prepare returns on CPU/GPU without FSDP) holds an unsharded
        # replica: judge the module inside, under its own names.
        while type(self.model).__name__ == "DistributedDataParallel":
            self.model = self.model.module

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group) if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    @cached_property
    def inner(self) -> nn.Module:
        """The user's model inside FSDP1/DDP wrappers."""
        return unwrap(self.model)

    @cached_property
    def config(self) -> Any:
        return getattr(self.inner, "config", None)

    @cached_property
    def checkpoint_reader(self) -> tuple[Checkpoint, str]:
        """The checkpoint, read lazily under the model's names (its headers parsed once for
        every check), and the base-model prefix its keys may carry or lack."""
        from smpcheck.checks.skeleton import skeleton

        reader = Checkpoint(self.checkpoint, skeleton(self.inner) or self.inner)
        return reader, getattr(self.inner, "base_model_prefix", "") + "."

    def pieces(self) -> list[Piece]:
        """This rank's pieces; recomputed on each call, so a check sees current values."""
        return list(iter_pieces(self.model))

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a small picklable object), indexed by rank. ``None`` from a
        rank means its check failed before it had anything to send."""
        self.gathers_done += 1
        if not dist.is_initialized() or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out


class Check(Protocol):
    """A check: a name, ``run(ctx) -> CheckResult`` for this rank, and how many
    ``ctx.all_gather`` calls ``run`` makes (the same on every rank, extra ones only when no
    gathered entry is ``None``)."""

    name: str
    gathers: int

    def run(self, ctx: CheckContext) -> CheckResult: ...


def result(
    name: str,
    findings: list[Finding],
    passed: str,
    failed: str | None = None,
    *,
    skip: str | None = None,
) -> CheckResult:
    """A CheckResult whose status follows from its findings (or a skip reason)."""
    if skip is not None:
        return CheckResult(name, Status.SKIP, skip)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        return CheckResult(name, Status.FAIL, failed or f"{len(errors)} problems", findings)
    return CheckResult(name, Status.PASS, passed, findings)


def merge_findings(per_rank: list[list[Finding]]) -> list[Finding]:
    """One finding per (tensor, problem), listing every rank that reported it."""
    merged: dict[tuple, Finding] = {}
    for findings in per_rank:
        for f in findings:
            key = (f.tensor, f.problem, f.expected, f.hint, f.severity)
            if key in merged:
                merged[key].ranks = sorted(set(merged[key].ranks) | set(f.ranks))
            else:
                merged[key] = Finding(**{**f.__dict__, "ranks": list(f.ranks)})
    return list(merged.values())


def run_check(check: Check, ctx: CheckContext) -> CheckResult:
    """Run ``check`` on this rank, turning an exception into an ``error`` result."""
    start = time.perf_counter()
    ctx.gathers_done = 0
    try:
        local = check.run(ctx)
    except Exception as exc:  # noqa: BLE001 - a broken check must not hide the others
        tail = traceback.format_exception(exc)[-1].strip()
        local = CheckResult(check.name, Status.ERROR, f"the check itself raised {tail}")
        # The other ranks are (or will be) in this check's collectives: join the ones this
        # rank skipped, sending None, so the group stays aligned instead of hanging.
        for _ in range(getattr(check, "gathers", 0) - ctx.gathers_done):
            ctx.all_gather(None)
    local.seconds = time.perf_counter() - start
    return local


def present(gathered: list[Any]) -> list[Any]:
    """The gathered entries of ranks whose check got far enough to send one."""
    return [g for g in gathered if g is not None]


def gather_result(ctx: CheckContext, local: CheckResult) -> CheckResult:
    """Merge every rank's result for one check into the result every rank reports."""
    results: list[CheckResult] = ctx.all_gather(local)
    status = Status.worst([r.status for r in results])
    first = next(rank for rank, r in enumerate(results) if r.status == status)
    message = results[first].message
    if len({r.message for r in results}) > 1:  # per-rank counts differ: say whose they are
        message = f"rank {first}: {message}"
    return CheckResult(
        local.name,
        status,
        message,
        merge_findings([r.findings for r in results]),
        max(r.seconds for r in results),
    )


def describe_diff(seen: torch.Tensor, expected: torch.Tensor) -> tuple[str, str, str]:
    """(expected, seen, detail) words for two same-shape tensors that differ."""
    if seen.shape != expected.shape:
        return f"shape {tuple(expected.shape)}", f"shape {tuple(seen.shape)}", "shape differs"
    a = seen.detach().float().cpu().reshape(-1)
    b = expected.detach().float().cpu().reshape(-1)
    differ = (a != b) & ~(torch.isnan(a) & torch.isnan(b))
    count = int(differ.sum())
    first = int(differ.nonzero()[0]) if count else 0
    diff = (a - b).abs().nan_to_num(float("inf"))
    return (
        f"{b[first].item():.6g} at flat index {first}",
        f"{a[first].item():.6g}",
        f"{count} of {a.numel()} elements differ, max |diff| {diff.max().item():.3g}",
    )
