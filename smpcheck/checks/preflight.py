"""preflight: the same structure on every rank, before any FSDP or TP collective runs.

FSDP1's flat-parameter broadcast dies inside gloo ("Received data size doesn't match expected
size") when one rank's parameter list differs, e.g. a tie that holds on rank 0 and not on
rank 1. Here every rank sends its structure (names, shapes, dtypes, requires_grad, placements,
tie groups, device types: O(tensors), never values) in the framework's one gather, and the
first differences from the lowest rank are named, rank by rank.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from smpcheck.checks.base import CheckContext, merge_findings, ranked, result
from smpcheck.report.model import CheckResult, Finding
from smpcheck.shards.pieces import flat_full_shapes, observed_tie_groups
from smpcheck.shards.tensors import clean_name

MAX_DIFFERENCES_PER_RANK = 10


def structure(model: nn.Module) -> dict:
    """This rank's structure: per tensor (kind, shape, dtype, requires_grad, placements),
    tie groups, and device types (meta excluded: rank 0 real, others meta is the recipe)."""
    full_shapes = flat_full_shapes(model)
    tensors = {
        name: ["param", shape, dtype, True, []] for name, (shape, dtype) in full_shapes.items()
    }
    seen = set()
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for raw, t in items:
            name = clean_name(raw)
            if id(t) in seen or name in full_shapes or "_flat_param" in raw:
                continue
            seen.add(id(t))
            placements = [str(p) for p in getattr(t, "placements", ())]
            tensors[name] = [
                kind,
                list(t.shape),
                str(t.dtype).replace("torch.", ""),
                bool(t.requires_grad),
                placements,
            ]
    ties = sorted(sorted(g) for g in observed_tie_groups(model))
    devices = sorted({t.device.type for t in [*model.parameters(), *model.buffers()]} - {"meta"})
    return {"tensors": tensors, "ties": ties, "devices": devices}


def _differences(base: dict, other: dict) -> list[tuple[str, str, str, str]]:
    """(tensor, problem, rank 0's, this rank's) for the first structural differences."""
    out = []
    a, b = base["tensors"], other["tensors"]
    for name in [n for n in a if n not in b]:
        out.append((name, "missing on this rank", "present", "absent"))
    for name in [n for n in b if n not in a]:
        out.append((name, "exists only on this rank", "absent", "present"))
    fields = ("kind", "shape", "dtype", "requires_grad", "placements")
    for name in [n for n in a if n in b and a[n] != b[n]]:
        for field, x, y in zip(fields, a[name], b[name]):
            if x != y:
                out.append((name, f"{field} differs", str(x), str(y)))
    ties_a, ties_b = {tuple(g) for g in base["ties"]}, {tuple(g) for g in other["ties"]}
    for group in sorted(ties_a - ties_b):
        out.append((" = ".join(group), "tied on rank 0, not tied here", "tied", "untied"))
    for group in sorted(ties_b - ties_a):
        out.append((" = ".join(group), "tied here, not on rank 0", "untied", "tied"))
    if base["devices"] and other["devices"] and base["devices"] != other["devices"]:
        out.append(
            (
                "(model)",
                "device types differ",
                ",".join(base["devices"]),
                ",".join(other["devices"]),
            )
        )
    return out


_HINTS = {
    "tied": "tie the weights identically on every rank (model.tie_weights() after building "
    "on meta) before FSDP/TP, or FSDP's broadcast aborts inside the backend",
    "dtype": "load/build every rank in one dtype (FSDP flattens only uniform dtypes)",
    "shape": "every rank must build the same config (same checkpoint, same overrides)",
}


def _hint(problem: str) -> str:
    return next(
        (h for key, h in _HINTS.items() if key in problem),
        "build the same model on every rank before wrapping",
    )


class Preflight:
    name = "preflight"

    def summarize(self, ctx: CheckContext) -> dict:
        return structure(ctx.model)

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        present = ranked(summaries)
        base_rank, base = present[0]
        count = f"{len(base['tensors'])} tensors, {len(base['ties'])} tie groups"
        findings, listed = [], ""
        for rank, mine in present[1:]:
            differences = _differences(base, mine)
            for tensor, problem, want, here in differences[:MAX_DIFFERENCES_PER_RANK]:
                findings.append(Finding(tensor, [rank], problem, want, here, _hint(problem)))
            if len(differences) > MAX_DIFFERENCES_PER_RANK and not listed:
                listed = (f" ({len(differences)} differences on rank {rank}, the first "
                          f"{MAX_DIFFERENCES_PER_RANK} listed)")
        findings = merge_findings([[f] for f in findings])
        if not findings:
            return result(self.name, [], f"{count}: identical on all {len(summaries)} ranks")
        return result(self.name, findings, "", f"{count}: structure differs across ranks"
                      f"{listed} (compared with rank {base_rank})")
