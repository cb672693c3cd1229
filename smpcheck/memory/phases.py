"""Names of the phases of a run, and the rule for which of them the memory bound covers.

A leaf module (no smpcheck imports) shared by the job that marks phases, the memory check that
bounds them, and the report writers and comparison that chart them, so the rule lives once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

START = "start"  # warm-up collectives, before the strategy
LOAD = "load"
TRANSFORM = "transform"
WRAP = "wrap"  # a strategy names which of load, transform, wrap it runs (phase_names)
CHECK = "check"  # smpcheck's reading and comparing
FORWARD = "forward"  # smpcheck's forward passes: one training step's worth of unsharding
REPORT = "report"  # after the checks: rank 0 writes the reports, the others wait for it

# The strategy's phases are bounded by the memory check; smpcheck's own phases are charted and
# measured (benchmarks/check_cost.py), never held against the strategy under test.
UNBOUNDED_PHASES = frozenset({CHECK, FORWARD})


def is_bounded(name: str) -> bool:
    """True for a phase whose peak the strategy's memory bound must cover."""
    return name not in UNBOUNDED_PHASES


def bounded(phases: Iterable[Any]) -> list[Any]:
    """The bounded phases among ``phases`` (``Phase`` objects or their dicts)."""
    return [p for p in phases if is_bounded(p["name"] if isinstance(p, dict) else p.name)]
