"""Shared fixtures: tiny checkpoints written once per test session (per xdist worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.models import FAMILIES, write_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Tiny models on a shared machine: one intra-op thread per rank. With torch's default (one per
# core) every rank of every xdist worker fights for the same cores, and a suite run slows down
# several times under load.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The same Hypothesis examples on every run by default, so a submission's CI verdict is about
# the change, not the draw; a new counterexample turns up in an exploring run, kept as an
# @example. Explore by hand: SMPCHECK_HYPOTHESIS=explore pytest -k hypothesis -n auto
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("SMPCHECK_HYPOTHESIS", "fixed"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per model family, by family name."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_family(family, root) for family in FAMILIES}
