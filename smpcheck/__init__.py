"""smpcheck: verify that distributed init of a Hugging Face model left every rank right."""

from smpcheck.runner import RankError, RankTimeout, run_on_ranks

__all__ = ["RankError", "RankTimeout", "run_on_ranks"]
__version__ = "0.1.0"
