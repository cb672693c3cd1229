"""The rule that gave a fresh tensor its first values.

A tensor that no checkpoint holds (a new task head, a LoRA adapter, new embedding rows) has no
expected *value*, only an expected *distribution*: the one its init function drew from. An
:class:`InitRule` names that distribution and who applied it, so a judge can test the values a
rank holds against it (:mod:`smpcheck.expect.fresh.init_judge`) and a report can say what was
expected. Rules are found by replaying the init function on a meta twin
(:mod:`smpcheck.expect.fresh.init_replay`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

#: Kinds a rule can have. ``unknown`` covers inits no statistic can judge (orthogonal,
#: data-dependent PiSSA/OLoRA/LoftQ/EVA, copies of computed values).
KINDS = ("normal", "uniform", "trunc_normal", "constant", "unknown")


def fmt(x: float) -> str:
    """A number as a person writes it: 0.02, 0.125, 1e-18, -2."""
    return f"{x:.3g}"


@dataclass(frozen=True)
class InitRule:
    """One tensor's init rule: a distribution (or constant), who applied it, and how.

    Attributes:
        kind: one of :data:`KINDS`.
        mean, std: of ``normal`` and ``trunc_normal`` (before truncation).
        low, high: bounds of ``uniform``; cut-offs of ``trunc_normal``.
        value: of ``constant``.
        source: who applied it, e.g. ``"LlamaForSequenceClassification._init_weights"``.
        via: the init function and its arguments, e.g. ``"kaiming_uniform_(a=2.24)"``.
        reason: why an ``unknown`` rule cannot be judged.
        zeroed: elements a later partial write set to zero (an embedding's padding row).
    """

    kind: str
    mean: float = 0.0
    std: float = 0.0
    low: float = 0.0
    high: float = 0.0
    value: float = 0.0
    source: str = ""
    via: str = ""
    reason: str = ""
    zeroed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"init rule kind {self.kind!r} is not one of {KINDS}")

    @classmethod
    def normal(cls, mean: float, std: float, **how: str) -> InitRule:
        return cls("normal", mean=float(mean), std=float(std), **how)

    @classmethod
    def uniform(cls, low: float, high: float, **how: str) -> InitRule:
        return cls("uniform", low=float(low), high=float(high), **how)

    @classmethod
    def trunc_normal(cls, mean: float, std: float, low: float, high: float,
                     **how: str) -> InitRule:
        return cls("trunc_normal", mean=float(mean), std=float(std), low=float(low),
                   high=float(high), **how)

    @classmethod
    def constant(cls, value: float, **how: str) -> InitRule:
        return cls("constant", value=float(value), **how)

    @classmethod
    def unknown(cls, reason: str, **how: str) -> InitRule:
        return cls("unknown", reason=reason, **how)

    def with_(self, **changes: object) -> InitRule:
        """A copy with some fields changed (the rule is frozen)."""
        return dataclasses.replace(self, **changes)

    @property
    def judgeable(self) -> bool:
        return self.kind != "unknown"

    def distribution(self) -> str:
        """The law alone: ``normal(0, 0.02)``, ``uniform(-0.125, 0.125)``, ``constant(0)``."""
        if self.kind == "normal":
            return f"normal({fmt(self.mean)}, {fmt(self.std)})"
        if self.kind == "uniform":
            return f"uniform({fmt(self.low)}, {fmt(self.high)})"
        if self.kind == "trunc_normal":
            return (f"trunc_normal({fmt(self.mean)}, {fmt(self.std)}, "
                    f"[{fmt(self.low)}, {fmt(self.high)}])")
        if self.kind == "constant":
            return f"constant({fmt(self.value)})"
        return f"unknown ({self.reason})" if self.reason else "unknown"

    def describe(self) -> str:
        """One phrase for a report: ``normal(0, 0.02) from LlamaForSequenceClassification.
        _init_weights``, with the init function where it adds something."""
        words = self.distribution()
        if self.via and not self.via.startswith(self.kind):
            words += f" by {self.via}"
        if self.source:
            words += f" from {self.source}"
        if self.zeroed:
            words += f", then {self.zeroed} elements zeroed"
        return words


def apply_rule(rule: InitRule, tensor: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``tensor``'s values from ``rule`` in place with torch's own init functions (what
    a correct init does; tests and benchmarks use it to make correct tensors).

    Raises:
        ValueError: for an ``unknown`` rule, which names no distribution to draw from.
    """
    init = torch.nn.init
    if rule.kind == "normal":
        init.normal_(tensor, rule.mean, rule.std, generator=generator)
    elif rule.kind == "uniform":
        init.uniform_(tensor, rule.low, rule.high, generator=generator)
    elif rule.kind == "trunc_normal":
        init.trunc_normal_(tensor, rule.mean, rule.std, rule.low, rule.high, generator=generator)
    elif rule.kind == "constant":
        init.constant_(tensor, rule.value)
    else:
        raise ValueError(f"cannot draw from {rule.describe()}")
    if rule.zeroed:
        with torch.no_grad():
            tensor.reshape(-1)[: rule.zeroed].zero_()
    return tensor

