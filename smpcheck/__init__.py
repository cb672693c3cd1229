"""smpcheck: verify that distributed init of a Hugging Face model left every rank right."""

from smpcheck.report.model import CheckResult, Finding, Report, Status
from smpcheck.runner import RankError, RankTimeout, run_on_ranks
from smpcheck.saves import verify_saved
from smpcheck.verify import PreflightError, preflight, verify

__all__ = [
    "CheckResult",
    "Finding",
    "PreflightError",
    "RankError",
    "RankTimeout",
    "Report",
    "Status",
    "preflight",
    "run_on_ranks",
    "verify",
    "verify_saved",
]
__version__ = "0.1.0"
