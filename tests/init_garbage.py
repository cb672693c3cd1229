"""Correct and wrong fresh inits, and the pieces ranks hold of them.

Shared by tests/test_init_rules.py and benchmarks/init_rules_false_failures.py: what a correct
init of a rule looks like (drawn with torch's own init functions, in the stored dtype or in
float32 and then cast), what garbage looks like (uninitialised memory, a constant fill, huge
values, NaN/Inf, another rule's distribution), and how FSDP/TP cut a tensor into pieces.
"""

from __future__ import annotations

import math

import torch

from smpcheck.expect.fresh.init_judge import expected_moments
from smpcheck.expect.fresh.init_rules import InitRule, apply_rule

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("rows", "columns", "flat")


def correct(rule: InitRule, shape: tuple[int, ...], dtype: torch.dtype,
            gen: torch.Generator, via_float32: bool = False) -> torch.Tensor:
    """A tensor ``rule`` initialised on ``gen``'s device, drawn in ``dtype`` (or in float32,
    then cast)."""
    empty = torch.empty(shape, dtype=torch.float32 if via_float32 else dtype, device=gen.device)
    return apply_rule(rule, empty, gen).to(dtype)


def pieces(full: torch.Tensor, layout: str, count: int) -> list[torch.Tensor]:
    """What ``count`` ranks hold: FSDP2 row shards (``Shard(0)``), TP column shards
    (``Shard(1)``), or FSDP1 flat ranges (equal ranges of the flattened tensor, the last
    short); some may be empty, as on real ranks."""
    if layout == "flat" or full.dim() < 2:
        flat = full.reshape(-1)
        step = max(1, math.ceil(flat.numel() / count))
        return [flat[i * step:(i + 1) * step] for i in range(count)]
    return list(full.chunk(count, dim=0 if layout == "rows" else 1))


def _scale(rule: InitRule) -> float:
    """The rule's natural magnitude: its std or bound, or its value."""
    if rule.kind == "uniform":
        return max(abs(rule.low), abs(rule.high))
    if rule.kind == "constant":
        return abs(rule.value) or 0.02
    return rule.std


def _other_law(rule: InitRule) -> InitRule | None:
    """Another rule with the same mean and variance (a uniform for a normal and back)."""
    if rule.kind == "constant":
        return InitRule.normal(rule.value, 0.02)
    mean = rule.mean if rule.kind == "normal" else (rule.low + rule.high) / 2
    if rule.kind == "uniform":
        return InitRule.normal(mean, (rule.high - rule.low) / math.sqrt(12))
    mean, std = expected_moments(rule)
    return InitRule.uniform(mean - math.sqrt(3) * std, mean + math.sqrt(3) * std)


def garbage_kinds(rule: InitRule, dtype: torch.dtype) -> tuple[str, ...]:
    """The kinds of garbage ``rule`` in ``dtype`` can be told from: no zeros for a rule of
    zeros; no other law for a truncated normal, whose shape is not judged (torch's own CUDA
    draw distorts it, so another law inside its bounds passes), nor a larger spread in 16
    bits, where that draw spreads values anywhere inside the bounds."""
    kinds = ["tiny", "constant", "huge", "nan", "inf"]
    if rule.kind != "trunc_normal" or dtype not in (torch.bfloat16, torch.float16):
        kinds.append("rescaled")
    if rule.kind != "trunc_normal":
        kinds.append("other_law")
    return tuple(kinds + ([] if rule.kind == "constant" and rule.value == 0 else ["zeros"]))


def garbage(rule: InitRule, kind: str, n: int, dtype: torch.dtype,
            gen: torch.Generator) -> torch.Tensor:
    """``n`` values that a correct ``rule`` init should never be, on ``gen``'s device.

    Kinds: ``tiny`` (uninitialised memory: magnitudes 1e-40..1e-12), ``zeros``, ``constant``
    (a plausible-looking value, inside the rule's spread), ``huge`` (std 1e4), ``nan`` and
    ``inf`` (one bad element in a correct draw), ``other_law`` (same mean and variance, other
    shape: uniform for normal), ``rescaled`` (x50 spread: std 1 where 0.02 was due; Kaiming
    bounds where a constant was due).
    """
    device = gen.device
    if kind == "tiny":
        exponent = torch.empty(n, device=device).uniform_(-40, -12, generator=gen)
        sign = torch.randint(0, 2, (n,), generator=gen, device=device) * 2 - 1
        return (sign * 10.0**exponent).to(dtype)
    if kind == "zeros":
        return torch.zeros(n, dtype=dtype, device=device)
    if kind == "constant":
        value = rule.value + 0.5 if rule.kind == "constant" else _constant_inside(rule)
        return torch.full((n,), value, dtype=dtype, device=device)
    if kind == "huge":
        return (torch.randn(n, generator=gen, device=device) * 1e4).to(dtype)
    if kind in ("nan", "inf"):
        out = correct(rule, (n,), dtype, gen)
        at = int(torch.randint(0, n, (1,), generator=gen, device=device))
        out[at] = math.nan if kind == "nan" else math.inf
        return out
    if kind == "other_law":
        return correct(_other_law(rule), (n,), dtype, gen)
    if kind == "rescaled":
        if rule.kind == "constant":
            return correct(InitRule.uniform(-0.125, 0.125), (n,), dtype, gen)
        return correct(rule, (n,), dtype, gen).float().mul(50).to(dtype)
    raise ValueError(kind)


def _constant_inside(rule: InitRule) -> float:
    if rule.kind == "uniform":
        return rule.low + 0.3 * (rule.high - rule.low)
    return rule.mean + 0.5 * rule.std


def rule_from(family: str, scale: float, mean: float = 0.0, cut: float = 2.0,
              skew: float = 1.0) -> InitRule:
    """A rule of one family at one scale, as tests and benchmarks draw them: a uniform spans
    ``[mean - scale, mean + skew * scale]``, a truncated normal keeps ``cut`` stds each side."""
    if family == "normal":
        return InitRule.normal(mean, scale)
    if family == "uniform":
        return InitRule.uniform(mean - scale, mean + skew * scale)
    if family == "trunc_normal":
        return InitRule.trunc_normal(mean, scale, mean - cut * scale, mean + cut * scale)
    if family == "constant":
        return InitRule.constant(mean)
    raise ValueError(family)


FAMILIES = ("normal", "uniform", "trunc_normal", "constant")
