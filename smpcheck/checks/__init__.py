"""One module per check. Checks read a model; they never build or change one, never
communicate (the framework in :mod:`smpcheck.checks.base` does), and never import
``reference_impl``: they must judge any implementation, ours included."""

from smpcheck.checks.base import AnyCheck, Check, CheckContext, CollectiveCheck
from smpcheck.checks.checkpoint_parity import CheckpointParity
from smpcheck.checks.config_parity import ConfigParity
from smpcheck.checks.coverage import Coverage
from smpcheck.checks.forward import ForwardSmoke
from smpcheck.checks.fresh_init import FreshInit
from smpcheck.checks.initialised import Initialised
from smpcheck.checks.masters import Masters
from smpcheck.checks.memory import MemoryCheck
from smpcheck.checks.preflight import Preflight
from smpcheck.checks.rank_parity import RankParity
from smpcheck.checks.tp import TPNumerics, TPShards

ALL_CHECKS: dict[str, type[AnyCheck]] = {
    c.name: c
    for c in (
        Preflight,
        ConfigParity,
        Initialised,
        RankParity,
        CheckpointParity,
        Coverage,
        FreshInit,
        Masters,
        TPShards,
        ForwardSmoke,
        TPNumerics,
        MemoryCheck,
    )
}

__all__ = ["ALL_CHECKS", "AnyCheck", "Check", "CheckContext", "CollectiveCheck"]
