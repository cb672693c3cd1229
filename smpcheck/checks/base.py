"""What every check shares: the context it reads, the protocols it follows, and the framework
that runs checks so that only the framework communicates.

A check never calls a collective. It runs in three steps:

1. ``summarize(ctx)`` on this rank: a small picklable summary of what this rank holds (or a
   :class:`Skip`). It may raise: the framework puts a :class:`RankFailed` (one sentence, and
   the traceback for the JSON report) in its place, and the rank still joins every collective.
2. The framework all-gathers every check's summary in **one** collective.
3. ``judge(ctx, summaries)`` turns the gathered list (indexed by rank) into a
   :class:`CheckResult`. Every rank judges the same list, so every rank holds the same report
   and a fault seen only on rank 5 fails rank 0's report too.

Some work is collective in itself (a forward pass through FSDP or TP). Such a check is a
:class:`CollectiveCheck`: ``prepare`` is local and only its readiness travels in the one
gather; when every rank is ready, every rank runs ``collective`` together and a second gather
brings those summaries; when any rank failed or skipped before that point, no rank enters the
collective, so a fault planted on one rank cannot leave the others waiting in it.
"""

from __future__ import annotations

import socket
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist
from torch import nn

from smpcheck.expect.expected import Comparison, Expectations, Source
from smpcheck.expect.peft_names import PeftView, peft_view
from smpcheck.report.model import CheckResult, Finding, Status
from smpcheck.run import whereabouts
from smpcheck.shards.pieces import Piece, iter_pieces, unwrap


@dataclass(frozen=True)
class Skip:
    """A check that has nothing to judge on this rank (no checkpoint, no TP), and why."""

    reason: str


@dataclass(frozen=True)
class RankFailed:
    """Stands in the gathered list for a rank whose part of a check raised."""

    rank: int
    error: str  # the exception as one line: "module.Type: message"
    traceback: str


@dataclass
class CheckContext:
    """Everything a check may read. Checks never build or change a model, and never
    communicate: the framework does."""

    model: nn.Module
    checkpoint: Path | None = None
    dense_model: nn.Module | None = None
    process_group: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    adapter: Path | None = None  # a PEFT adapter directory the adapters were loaded from
    config_overrides: dict[str, Any] = field(default_factory=dict)  # declared on purpose
    checks: tuple[str, ...] = ()  # the checks this verify runs (some share work)
    adapter_complete: bool = False  # the adapter file was just saved: it must hold them all

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
        return getattr(self.view.base, "config", None)

    @cached_property
    def view(self) -> PeftView:
        """The model's names against its base model's (PEFT wraps and renames)."""
        return peft_view(self.inner)

    @cached_property
    def expectations(self) -> Expectations:
        """Every tensor's source of truth, and the checkpoint readers (headers parsed once
        for every check)."""
        return Expectations(self.view, self.checkpoint, self.adapter, self.world_size,
                            self.rank, split_replicas="rank_parity" in self.checks,
                            adapter_complete=self.adapter_complete)

    @cached_property
    def one_pass(self) -> tuple[list[tuple[Piece, Source]], list[Comparison]]:
        """Each piece's source, and this rank's comparisons with the files: read once,
        answered by checkpoint_parity and tp_shards alike."""
        return self.expectations.run(self.pieces())

    def pieces(self) -> list[Piece]:
        """This rank's pieces; recomputed on each call, so a check sees current values."""
        return list(iter_pieces(self.model))

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small and picklable), indexed by rank. Framework use only."""
        if not dist.is_initialized() or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out


@runtime_checkable
class Check(Protocol):
    """A rank-local summary, then a verdict on every rank's summary."""

    name: str

    def summarize(self, ctx: CheckContext) -> Any:
        """This rank's small picklable summary, or a :class:`Skip`."""
        ...

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        """The verdict from every rank's summary (entries may be :class:`Skip` or
        :class:`RankFailed`); must depend on ``summaries`` only, so every rank agrees."""
        ...


@runtime_checkable
class CollectiveCheck(Protocol):
    """A check whose work is a collective in itself (a forward pass through FSDP or TP)."""

    name: str

    def prepare(self, ctx: CheckContext) -> Any:
        """Rank-local preparation (inputs, references), or a :class:`Skip`."""
        ...

    def collective(self, ctx: CheckContext, prepared: Any) -> Any:
        """Run together on every rank once all are prepared; returns this rank's summary."""
        ...

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult: ...


AnyCheck = Check | CollectiveCheck
_READY = "ready"


def _attempt(ctx: CheckContext, fn: Any, *args: Any) -> Any:
    """``fn(ctx, *args)``, or a :class:`RankFailed` holding what it raised."""
    try:
        return fn(ctx, *args)
    except Exception as exc:  # noqa: BLE001 - a broken check must not stop the others
        return RankFailed(ctx.rank, traceback.format_exception_only(exc)[-1].strip(),
                          "".join(traceback.format_exception(exc)))


def is_collective(check: AnyCheck) -> bool:
    return callable(getattr(check, "collective", None))


@dataclass
class Verdicts:
    """What :func:`run_checks` returns, the same on every rank."""

    results: list[CheckResult]
    gathered: dict[str, list[Any]]  # every check's summaries, indexed by rank
    hosts: list[str]  # the host each rank ran on


def run_checks(ctx: CheckContext, checks: Sequence[AnyCheck]) -> Verdicts:
    """Run ``checks`` on this rank with at most two collectives in all (the second only for
    collective checks that every rank is ready for)."""
    local: dict[str, Any] = {}
    prepared: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for check in checks:
        whereabouts.within(check.name)
        start = time.perf_counter()
        if is_collective(check):
            outcome = _attempt(ctx, check.prepare)
            if not isinstance(outcome, (Skip, RankFailed)):
                prepared[check.name], outcome = outcome, _READY
        else:
            outcome = _attempt(ctx, check.summarize)
        local[check.name] = outcome
        seconds[check.name] = time.perf_counter() - start
    first = ctx.all_gather((local, seconds, socket.gethostname()))
    gathered = {c.name: [entry[0][c.name] for entry in first] for c in checks}
    times = {c.name: max(entry[1][c.name] for entry in first) for c in checks}
    ready = [c for c in checks if is_collective(c)
             and all(s == _READY for s in gathered[c.name])]
    if ready:
        mine = {}
        for check in ready:
            whereabouts.within(check.name)
            start = time.perf_counter()
            mine[check.name] = _attempt(ctx, check.collective, prepared[check.name])
            seconds[check.name] += time.perf_counter() - start
        second = ctx.all_gather((mine, seconds))
        for check in ready:
            gathered[check.name] = [entry[0][check.name] for entry in second]
            times[check.name] = max(entry[1][check.name] for entry in second)
    results = [_judge(ctx, check, gathered[check.name]) for check in checks]
    for result in results:
        result.seconds = times[result.name]
    return Verdicts(results, gathered, [entry[2] for entry in first])


def _judge(ctx: CheckContext, check: AnyCheck, summaries: list[Any]) -> CheckResult:
    failed = [s for s in summaries if isinstance(s, RankFailed)]
    skips = [s for s in summaries if isinstance(s, Skip)]
    if len(skips) == len(summaries):
        return CheckResult(check.name, Status.SKIP, skips[0].reason)
    if len(failed) + len(skips) == len(summaries) or (is_collective(check) and _READY in
                                                       summaries):
        result = CheckResult(check.name, Status.ERROR, "")  # nothing (else) to judge
    else:
        judged = _attempt(ctx, check.judge, summaries)
        if isinstance(judged, RankFailed):
            return CheckResult(check.name, Status.ERROR, f"judging raised {judged.error}",
                               traceback=judged.traceback)
        result = judged
    if not failed:
        if result.status == Status.ERROR and not result.message:  # a collective was skipped
            reasons = [s.reason for s in skips]
            return CheckResult(check.name, Status.SKIP, "; ".join(sorted(set(reasons))))
        return result
    head = failed[0]
    others = [f.rank for f in failed[1:]]
    also = f" (also on ranks {others})" if others else ""
    return CheckResult(check.name, Status.ERROR,
                       f"rank {head.rank}: the check itself raised {head.error}{also}",
                       result.findings, traceback=head.traceback)


def ranked(summaries: list[Any]) -> list[tuple[int, Any]]:
    """(rank, summary) for the ranks that produced one (not skipped, not failed)."""
    return [(r, s) for r, s in enumerate(summaries) if not isinstance(s, (Skip, RankFailed))]


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


@dataclass
class LocalFindings:
    """The summary of a check whose findings are rank-local: what it found, and a count
    sentence ("42 tensors, 3 buffers recomputed") for the report."""

    findings: list[Finding]
    words: str


def judge_local(name: str, summaries: list[Any], passed: str = "all correct") -> CheckResult:
    """Merge :class:`LocalFindings` from every rank into one verdict. The count sentence is
    the lowest rank's, prefixed with it when ranks' counts differ (shards differ in size)."""
    present = ranked(summaries)
    findings = merge_findings([s.findings for _, s in present])
    words = {s.words for _, s in present}
    rank, first = present[0]
    sentence = first.words if len(words) == 1 else f"rank {rank}: {first.words}"
    errors = sum(f.severity == "error" for f in findings)
    return result(name, findings, f"{sentence}: {passed}", f"{sentence}: {errors} problems")
