"""initialised: nothing on meta, no garbage, buffers as the config computes them, ties intact.

Uninitialised memory is usually finite and often small (FastPLMs#47: ``inv_freq[0]`` was
6.93e-18 instead of 1.0), so a NaN scan alone misses it. What this check can see without a
checkpoint: meta tensors, NaN/Inf, magnitudes no trained weight has, and every
non-persistent buffer compared bit for bit with a fresh computation from the config (buffers are
never held to the magnitude rule: a constant mask of -1e9 is by design). Values of
parameters are judged against their sources by ``checkpoint_parity`` and ``fresh_init``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from smpcheck.checks.base import CheckContext, LocalFindings, judge_local
from smpcheck.expect.skeleton import buffers_of, skeleton
from smpcheck.report.model import CheckResult, Finding
from smpcheck.shards.pieces import observed_tie_groups
from smpcheck.shards.tensors import describe_diff, tie_groups

# No trained weight comes near this; to_empty garbage often does (1e30s are common).
IMPLAUSIBLE_MAGNITUDE = 1e6
BUFFER_HINT = ("recompute it after materialising (e.g. model._init_weights on its module) or "
               "broadcast it from rank 0; no state dict carries it")


class Initialised:
    name = "initialised"

    def summarize(self, ctx: CheckContext) -> LocalFindings:
        rank, view = ctx.rank, ctx.view
        fresh = skeleton(view.base)
        fresh_buffers = buffers_of(fresh)
        findings: list[Finding] = []
        pieces = ctx.pieces()
        for piece in pieces:
            data = piece.data
            if data.is_meta:
                findings.append(Finding(piece.name, [rank], "still on the meta device",
                                        hint="materialise it (param_init_fn, or to_empty + "
                                        "init + load) before training"))
                continue
            expected = fresh_buffers.get(view.base_name(piece.name)[0])
            if data.is_floating_point() and data.numel() and (piece.is_param or expected is None):
                findings += _garbage(piece.name, data, rank, magnitude=piece.is_param)
            if expected is not None and not piece.is_param:
                expected = expected.to(data.device, data.dtype)
                if data.shape != expected.shape or not torch.equal(data, expected):
                    want, seen, detail = describe_diff(data, expected)
                    findings.append(Finding(piece.name, [rank], "non-persistent buffer differs "
                                            "from a fresh computation from the config "
                                            f"({detail})", want, seen, BUFFER_HINT))
        expected_ties = [] if fresh is None else [{n for n, _, _ in g} for g in tie_groups(fresh)]
        findings += _broken_ties(ctx, expected_ties)
        return LocalFindings(findings, f"{len(pieces)} tensors, {len(fresh_buffers)} buffers "
                             "recomputed from config")

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        return judge_local(self.name, summaries, "all initialised")


def _garbage(name: str, data: torch.Tensor, rank: int, magnitude: bool = True) -> list[Finding]:
    """NaN/Inf or implausible magnitudes, from one pass that allocates nothing per element
    (``aminmax`` propagates NaN and shows Inf): checking costs no copy of the weights.

    Only parameters are held to the magnitude rule (and to finiteness): a buffer may hold a
    constant mask of -1e9 or -inf by design, so a buffer without a fresh computation to
    compare with is only required to hold no NaN."""
    low, high = (float(v) for v in torch.aminmax(data.detach().reshape(-1)))
    if not magnitude:
        if math.isnan(low) or math.isnan(high):
            bad = int(torch.isnan(data).sum())
            return [Finding(name, [rank], f"{bad} of {data.numel()} values are NaN",
                            hint="uninitialised memory or a failed init: recompute or load "
                            "this buffer after materialising")]
        return []
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(data)).sum())
        return [Finding(name, [rank], f"{bad} of {data.numel()} values are NaN or Inf",
                        hint="uninitialised memory or a failed init; compare with the "
                        "checkpoint and re-run the init for this module")]
    peak = max(abs(low), abs(high))
    if peak > IMPLAUSIBLE_MAGNITUDE:
        return [Finding(name, [rank], f"holds values up to {peak:.3g}, beyond any trained weight",
                        f"|x| <= {IMPLAUSIBLE_MAGNITUDE:g}", f"{peak:.3g}",
                        "uninitialised memory (to_empty without an init or a load?)")]
    return []


def _broken_ties(ctx: CheckContext, expected: list[set[str]]) -> list[Finding]:
    """Tie groups of the config (base-model names) that are not one tensor on this rank."""
    observed = [{ctx.view.base_name(n)[0] for n in group}
                for group in observed_tie_groups(ctx.model)]
    findings = []
    for group in expected:
        if not any(group <= seen for seen in observed):
            findings.append(Finding(
                " = ".join(sorted(group)), [ctx.rank],
                "tied by the config but not one shared tensor (equal values are not enough: "
                "gradients reach only one of them)", "one shared Parameter", "separate tensors",
                "call model.tie_weights() after to_empty/materialisation, before wrapping"))
    return findings
