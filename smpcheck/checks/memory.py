"""memory: every rank's peak anonymous memory stays under the bound derived from the model.

Fed by the per-rank :class:`~smpcheck.memory.MemoryMonitor` (``ctx.options["memory"]``
holds this rank's record and bound). Records are gathered, so the report holds every rank's
timeline. A phase whose kernel peak exceeds every sample had a spike shorter than the
sampling interval: reported as a warning, with the kernel's figure.
"""

from __future__ import annotations

from dataclasses import asdict

from smpcheck.checks.base import CheckContext, result
from smpcheck.report.model import CheckResult, Finding

MIB = 2**20
UNBOUNDED_PHASE = "check"


class MemoryCheck:
    name = "memory"
    gathers = 1

    def run(self, ctx: CheckContext) -> CheckResult:
        mine = ctx.options.get("memory")
        if mine is None:
            return result(
                self.name,
                [],
                "",
                skip="no memory monitor ran (smpcheck run records "
                "one; pass memory=(record, bound) to verify)",
            )
        record, bound = mine
        findings = []
        # smpcheck's own phase (a dense copy for tp_numerics, say) is charted, not bounded.
        bounded = [p for p in record.phases if p.name != UNBOUNDED_PHASE]
        worst = max(bounded, key=lambda p: p.peak_anon, default=None)
        if worst is not None and worst.peak_anon > bound.limit:
            excess = worst.peak_anon - bound.limit
            findings.append(
                Finding(
                    f"host memory, phase '{worst.name}'",
                    [ctx.rank],
                    f"peak anonymous memory {worst.peak_anon / MIB:.0f} MiB exceeds the bound by "
                    f"{excess / MIB:.0f} MiB",
                    f"<= {bound.limit / MIB:.0f} MiB ({bound.derivation})",
                    f"{worst.peak_anon / MIB:.0f} MiB",
                    "this rank holds more of the model than the strategy needs: a full copy on a "
                    "non-zero rank, or a cast/flatten that duplicates the weights",
                )
            )
        for phase in record.phases:
            if phase.spike_missed_by_sampling:
                findings.append(
                    Finding(
                        f"host memory, phase '{phase.name}'",
                        [ctx.rank],
                        f"the kernel's peak RSS ({phase.kernel_peak_rss / MIB:.0f} MiB) exceeds "
                        f"every sample ({phase.peak_rss_sampled / MIB:.0f} MiB): a spike shorter "
                        f"than the {record.interval * 1000:.0f} ms sampling interval",
                        severity="warning",
                    )
                )
        ctx.options["memory_gathered"] = ctx.all_gather((record.to_dict(), asdict(bound)))
        peak = worst.peak_anon / MIB if worst else 0
        words = f"peak {peak:.0f} MiB anonymous vs bound {bound.limit / MIB:.0f} MiB"
        return result(self.name, findings, words, words)
