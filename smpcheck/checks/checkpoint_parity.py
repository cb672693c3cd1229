"""checkpoint parity: what every rank holds equals the files its expected value comes from.

Each rank compares the pieces it holds (whole tensors, DTensor shards, FSDP1 flat ranges) with
the bytes of the checkpoint those pieces should hold, read as safetensors slices in the one pass
of :mod:`smpcheck.expect.expected`. A tensor with no source is missing; a checkpoint tensor no rank
used is unexpected (a warning: ``lm_head`` under a classification head); a dtype cast between
file and model is stated, and so are the bytes each rank read.
"""

from __future__ import annotations

import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from smpcheck.checks.base import CheckContext, Skip, merge_findings, ranked, result
from smpcheck.expect.expected import FUSED, MISSING
from smpcheck.report.model import CheckResult, Finding
from smpcheck.report.units import human_bytes

HINT = (
    "this rank's value is not the checkpoint's: check that rank 0 loaded this checkpoint "
    "and that it reached every rank (sync_module_states / broadcast_from_rank0)"
)
_LAYER_INDEX = re.compile(r"\.\d+\.")


STALE_HINT = ("every node must read the same checkpoint: this host holds a stale or partial "
              "copy (loaders that read on each node's local rank 0 spread it silently); sync "
              "the files, or load on global rank 0 only")


@dataclass
class Summary:
    findings: list[Finding]
    unused: set[str]  # checkpoint keys this rank's tensors do not stand for
    casts: set[str]
    compared: int
    bytes_read: int
    sources: dict[str, list[str]] = field(default_factory=dict)  # tensor group -> sources
    fingerprint: str = ""  # of this rank's copy of the files (headers and sampled blocks)
    fingerprint_bytes: int = 0
    host: str = ""


def source_groups(sources: list[tuple[Any, Any]]) -> dict[str, list[str]]:
    """Tensor groups (layer numbers folded into ``*``) -> the kinds of source they have."""
    groups: dict[str, Counter] = {}
    for piece, source in sources:
        group = _LAYER_INDEX.sub(".*.", piece.name)
        kind = source.kind if source.rows is None else (
            f"{source.kind} rows [0:{source.rows}), rows added by a resize judged by initialised")
        groups.setdefault(group, Counter())[kind] += 1
    return {g: sorted(kinds) for g, kinds in groups.items()}


class CheckpointParity:
    name = "checkpoint_parity"

    def summarize(self, ctx: CheckContext) -> Summary | Skip:
        if ctx.checkpoint is None:
            return Skip("no checkpoint given (checkpoint=PATH)")
        expectations = ctx.expectations
        sources, comparisons = ctx.one_pass
        findings = [
            Finding(c.name, [ctx.rank], f"{c.where} differs from {c.source.words()} "
                    f"({c.detail})", c.want, c.seen, HINT)
            for c in comparisons if not c.equal
        ]
        for piece, source in sources:
            if source.kind == MISSING:
                findings.append(Finding(piece.name, [ctx.rank], source.note,
                                        hint="this tensor kept its initial value: it was "
                                        "never loaded"))
            elif source.kind == FUSED and not source.keys:
                findings.append(Finding(piece.name, [ctx.rank], f"built on load from several "
                                        f"checkpoint tensors, but {source.note}: not compared",
                                        severity="warning"))
        fingerprint = expectations.checkpoint.fingerprint()
        unused = set(expectations.checkpoint.files) - expectations.used
        return Summary(findings, unused, expectations.casts, len(comparisons),
                       expectations.bytes_read, source_groups(sources), fingerprint,
                       expectations.checkpoint.fingerprint_bytes, socket.gethostname())

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        present = ranked(summaries)
        findings = merge_findings([s.findings for _, s in present]) + _copies_differ(present)
        unexpected = set.intersection(*(s.unused for _, s in present))
        findings += [
            Finding(key, [r for r, _ in present], "in the checkpoint but used by no tensor of "
                    "the model", hint="a renamed or dropped weight, or a head this model does "
                    "not have: is it the right checkpoint?", severity="warning")
            for key in sorted(unexpected)
        ]
        casts = sorted(set().union(*(s.casts for _, s in present)))
        cast_words = f"; dtype cast before comparing: {', '.join(casts)}" if casts else ""
        read = [s.bytes_read for _, s in present]
        words = (f"{sum(s.compared for _, s in present)} pieces compared with the files"
                 f"{cast_words}; read {human_bytes(max(read))} on the busiest rank, "
                 f"{human_bytes(sum(read))} in all, plus "
                 f"{human_bytes(max(s.fingerprint_bytes for _, s in present))} per rank to "
                 "fingerprint its copy")
        errors = sum(f.severity == "error" for f in findings)
        return result(self.name, findings, f"{words}: all equal", f"{words}: {errors} problems")


def _copies_differ(present: list[tuple[int, Summary]]) -> list[Finding]:
    """A finding for the ranks whose copy of the checkpoint is not the lowest rank's."""
    base_rank, base = present[0]
    other = [(r, s) for r, s in present if s.fingerprint != base.fingerprint]
    if not other:
        return []
    hosts = sorted({s.host for _, s in other})
    return [Finding("(checkpoint files)", [r for r, _ in other],
                    f"the copy of the checkpoint on {', '.join(hosts)} differs from the one "
                    f"rank {base_rank} reads on {base.host} (headers or sampled bytes differ)",
                    hint=STALE_HINT)]


def expected_data(summaries: list[Any], hosts: list[str]) -> dict[str, Any]:
    """The report's expected-values section: each tensor group's sources (every rank's
    merged) and the bytes each rank read from the files, with its host."""
    present = ranked(summaries)
    if not present:
        return {}
    sources: dict[str, set[str]] = {}
    for _, summary in present:
        for group, kinds in summary.sources.items():
            sources.setdefault(group, set()).update(kinds)
    reads = [{"rank": r, "host": hosts[r] if r < len(hosts) else "", "bytes": s.bytes_read}
             for r, s in present]
    return {"sources": {g: sorted(k) for g, k in sorted(sources.items())}, "reads": reads}
