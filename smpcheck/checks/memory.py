"""memory: every rank's peak anonymous memory stays under the bound derived from the model.

Fed by the per-rank :class:`~smpcheck.memory.MemoryMonitor` (``ctx.options["memory"]`` holds
this rank's record and bound). Each rank's record travels in the framework's one gather, so the
report holds every rank's timeline. A phase whose kernel peak exceeds every sample had a spike
shorter than the sampling interval: reported as a warning, with the kernel's figure. The
forward phase is not bounded (it unshards as a training step will); what it added to each rank's
peak is stated, with the FSDP units that explain it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from smpcheck.checks.base import CheckContext, Skip, merge_findings, ranked, result
from smpcheck.checks.unsharding import unit_sizes
from smpcheck.memory import Bound, MemoryRecord
from smpcheck.memory.phases import FORWARD, bounded
from smpcheck.report.model import CheckResult, Finding

MIB = 2**20


def _findings(rank: int, record: MemoryRecord, bound: Bound) -> list[Finding]:
    findings = []
    worst = max(bounded(record.phases), key=lambda p: p.peak_anon, default=None)
    if worst is not None and worst.peak_anon > bound.limit:
        excess = worst.peak_anon - bound.limit
        findings.append(Finding(
            f"host memory, phase '{worst.name}'", [rank],
            f"peak anonymous memory {worst.peak_anon / MIB:.0f} MiB exceeds the bound by "
            f"{excess / MIB:.0f} MiB", f"<= {bound.limit / MIB:.0f} MiB ({bound.derivation})",
            f"{worst.peak_anon / MIB:.0f} MiB",
            "this rank holds more of the model than the strategy needs: a full copy on a "
            "non-zero rank, or a cast/flatten that duplicates the weights"))
    for phase in record.phases:
        if phase.spike_missed_by_sampling:
            findings.append(Finding(
                f"host memory, phase '{phase.name}'", [rank],
                f"the kernel's peak RSS ({phase.kernel_peak_rss / MIB:.0f} MiB) exceeds every "
                f"sample ({phase.peak_rss_sampled / MIB:.0f} MiB): a spike shorter than the "
                f"{record.interval * 1000:.0f} ms sampling interval", severity="warning"))
    return findings


class MemoryCheck:
    name = "memory"

    def summarize(self, ctx: CheckContext) -> tuple[dict, dict, list[Finding], int] | Skip:
        mine = ctx.options.get("memory")
        if mine is None:
            return Skip("no memory monitor ran (smpcheck run records one; pass "
                        "memory=(record, bound) to verify)")
        record, bound = mine
        worst = max(bounded(record.phases), key=lambda p: p.peak_anon, default=None)
        peak = worst.peak_anon if worst else record.baseline_anon
        return record.to_dict(), asdict(bound), _findings(ctx.rank, record, bound), peak

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        present = ranked(summaries)
        findings = merge_findings([s[2] for _, s in present])
        rank, (_, bound, _, peak) = min(present, key=lambda e: e[1][1]["limit"] - e[1][3])
        words = (f"least headroom on rank {rank}: peak {peak / MIB:.0f} MiB anonymous vs bound "
                 f"{bound['limit'] / MIB:.0f} MiB") + _forward_words(ctx, present)
        return result(self.name, findings, words, words)


def forward_added(record: dict) -> int | None:
    """How far the forward phase raised a rank's anonymous peak above every phase before it
    (bytes; None when no forward phase ran)."""
    phases = record.get("phases", [])
    at = next((i for i, p in enumerate(phases) if p["name"] == FORWARD), None)
    if at is None:
        return None
    before = max((p["peak_anon"] for p in phases[:at]), default=record["baseline_anon"])
    return max(0, phases[at]["peak_anon"] - before)


def _forward_words(ctx: CheckContext, present: list[tuple[int, Any]]) -> str:
    added = [(a, rank) for rank, s in present if (a := forward_added(s[0])) is not None]
    if not added:
        return ""
    most, rank = max(added)
    words = f"; the forward phase added {most / MIB:.0f} MiB anonymous on rank {rank}"
    device = max((p.get("cuda_peak", 0) for _, s in present for p in s[0]["phases"]
                  if p["name"] == FORWARD), default=0)
    if device:
        words += f" (device peak {device / MIB:.0f} MiB)"
    units = unit_sizes(ctx.model)
    if units is None or units.count < 2:
        return words
    return (f"{words} (one unit unsharded at a time, at most {units.largest / MIB:.0f} MiB, "
            f"beside the root unit of {units.root / MIB:.0f} MiB; a unit is briefly held twice "
            "while gathered)")


def memory_data(summaries: list[Any]) -> dict[str, list[dict]]:
    """The report's memory section: every rank's record and bound, from the gathered list."""
    present = ranked(summaries)
    if not present:
        return {}
    return {"ranks": [s[0] for _, s in present], "bounds": [s[1] for _, s in present]}
