"""The fault-injection campaign's sample: each fault a cluster inflicts, once, at a phase of
its own, ends with its exit code, one sentence naming the rank and the cause, the report (or
why not), no process left and the checkpoint as the fault left it. Every fault at every phase
is ``benchmarks/fault_campaign.py``; the logic they share is ``tests/fault_cells.py``."""

from __future__ import annotations

import pytest

from smpcheck.checkpoint.demo import demo_checkpoint
from tests.fault_cells import run_cell

SAMPLE = [  # (fault, rank, phase): each fault once, the phases spread over the run
    ("kill", 1, "wrap"),
    ("kill", 0, "checkpoint_parity"),
    ("preempt", 1, "load"),
    ("stall", 1, "coverage"),
    ("truncate", 0, "forward"),
    ("replace", 1, "load"),
    ("eio", 1, "checkpoint_parity"),
    ("readonly", 0, "report"),
    ("full", 1, "start"),
    ("vanish", 1, "load"),  # a rank failing this early once left its node copy behind
]


@pytest.mark.parametrize("kind, rank, phase", SAMPLE, ids=[f"{k}-{r}-{p}" for k, r, p in SAMPLE])
def test_a_fault_ends_the_run_cleanly(kind, rank, phase, tmp_path) -> None:
    cell = run_cell(kind, phase, rank, demo_checkpoint(), tmp_path)
    assert cell.ok and not cell.note, f"{cell.problems} {cell.note}\n{cell.sentence}"
