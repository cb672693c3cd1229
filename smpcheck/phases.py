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
WRAP = "wrap"
STRATEGY_PHASES = (LOAD, TRANSFORM, WRAP)  # in order; a strategy yields each name when done
CHECK = "check"  # smpcheck's own work (it may hold a dense copy for tp_numerics)

# The strategy's phases are bounded by the memory check; smpcheck's own phase is charted and
# measured (benchmarks/check_cost.py), never held against the strategy under test.
UNBOUNDED_PHASES = frozenset({CHECK})


def is_bounded(name: str) -> bool:
    """True for a phase whose peak the strategy's memory bound must cover."""
    return name not in UNBOUNDED_PHASES


def bounded(phases: Iterable[Any]) -> list[Any]:
    """The bounded phases among ``phases`` (``Phase`` objects or their dicts)."""
    return [p for p in phases if is_bounded(p["name"] if isinstance(p, dict) else p.name)]
