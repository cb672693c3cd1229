"""One module per check. Checks read a model; they never build or change one, and never
import ``reference_impl``: they must judge any implementation, ours included."""

from smpcheck.checks.base import Check, CheckContext
from smpcheck.checks.checkpoint_parity import CheckpointParity
from smpcheck.checks.initialised import Initialised
from smpcheck.checks.memory import MemoryCheck
from smpcheck.checks.preflight import Preflight
from smpcheck.checks.rank_parity import RankParity
from smpcheck.checks.tp import TPNumerics, TPShards

ALL_CHECKS: dict[str, type] = {
    c.name: c
    for c in (
        Preflight,
        Initialised,
        RankParity,
        CheckpointParity,
        TPShards,
        TPNumerics,
        MemoryCheck,
    )
}

__all__ = ["ALL_CHECKS", "Check", "CheckContext"]
