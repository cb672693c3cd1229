"""Where this rank is: the phase it is in, held here and, when the run was self-launched, in
a file that the launching process reads after the rank is gone.

A rank killed by SIGKILL (the kernel's OOM killer) or SIGBUS, or stopped dead, says nothing
more; the launcher's record knows only its exit code. This file is how the closing sentence
still names the phase it died in, and holds the rank's pid so that a rank that stopped
answering can be stopped for good. Phases are the job's (``load``, ``wrap``, ``check``,
``report``...) with the check running inside them as detail (``check (coverage)``).

Entering a phase is also where a planted fault fires (:mod:`smpcheck.run.faults`): one call at
every phase boundary for both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from smpcheck.report.files import write_atomically
from smpcheck.run import faults

RUN_STATE = "SMPCHECK_RUN_STATE"  # set by the self-launch: a directory the ranks write into
_PREFIX = "phase-rank"
_here = {"phase": "start", "detail": ""}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def enter(phase: str, detail: str = "") -> None:
    """This rank now runs ``phase`` (and within it ``detail``, a check's name)."""
    _here.update(phase=phase, detail=detail)
    state = os.environ.get(RUN_STATE)
    if state:
        write_atomically(Path(state) / f"{_PREFIX}{_rank()}",
                         json.dumps({"phase": phase, "detail": detail, "pid": os.getpid()}))
    faults.arrive(_rank(), detail or phase)


def within(detail: str) -> None:
    """A step inside the current phase (a check): the phase stays, the detail changes."""
    enter(_here["phase"], detail)


def current() -> str:
    """This rank's phase, as a sentence names it: ``wrap`` or ``check (coverage)``."""
    return describe(_here)


def describe(where: dict) -> str:
    return f"{where['phase']} ({where['detail']})" if where.get("detail") else where["phase"]


def last_known(state: str | os.PathLike) -> dict[int, dict]:
    """``{rank: {"phase", "detail", "pid"}}``: where each rank last said it was."""
    known = {}
    for path in Path(state).glob(f"{_PREFIX}*"):
        try:
            known[int(path.name[len(_PREFIX):])] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return dict(sorted(known.items()))
