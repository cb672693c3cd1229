"""One cell of the fault-injection campaign: a ``smpcheck run`` with one planted fault
(:mod:`smpcheck.run.faults`) at one phase, judged on how it ended. Shared by
``tests/test_faults.py`` (a sample of cells) and ``benchmarks/fault_campaign.py`` (every fault
at every phase).

A cell ends well when:

* the exit code is the one the fault defines (1; 143 for a preemption; 3 when every check
  passed but the report directory refused the report). An ``eio`` planted after the rank's
  last read meets no read: the run passes (0, its report written), and the cell says so;
* stderr's last line is one ``smpcheck: `` sentence naming the rank (or, for the report
  directory, the directory and why), and no Python traceback reached the terminal;
* the report was written (a JSON report that parses, no partial file beside it), or the
  sentence says why it could not be;
* no process of the run is left;
* the checkpoint is as the fault left it, byte for byte: untouched, except the file a
  ``truncate`` or ``replace`` damaged, which holds exactly :func:`smpcheck.run.faults.damaged`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from smpcheck.run.faults import damaged, largest_file
from tests.console import run_cli

KINDS = ("kill", "preempt", "stall", "truncate", "replace", "eio", "readonly", "full", "vanish")
CHECKS = ("preflight", "config_parity", "initialised", "rank_parity", "checkpoint_parity",
          "coverage", "fresh_init", "masters", "tp_shards", "forward", "tp_numerics", "memory")
PHASES = ("start", "load", "transform", "wrap", *CHECKS, "report")
EXIT_CODES = {"preempt": 128 + signal.SIGTERM, "readonly": 3, "full": 3}
# Faults the launching process itself meets (a preemption signals the job's process group; a
# report directory refuses the launcher too): their cells run the real console script. The
# rest fault only ranks, and run warm in this process (tests/console.py).
LAUNCHER_KINDS = ("preempt", "readonly", "full")
STALL_TIMEOUT_S = 10  # counted from the stall's own mark, not from the start


@dataclass
class Cell:
    """How one run with one planted fault ended, and what about it was wrong."""

    kind: str
    phase: str
    rank: int
    code: int | None = None
    sentence: str = ""
    report: str = ""  # "written", or the sentence's reason it was not
    note: str = ""  # a fault that met nothing: why the run passed
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def expected_digests(kind: str, folder: Path, before: dict[str, str]) -> dict[str, str]:
    """What the checkpoint's files (``before``: their digests now) must hash to after the run:
    the same, but for the file a ``truncate`` or ``replace`` will damage."""
    if kind not in ("truncate", "replace"):
        return before
    target = largest_file(folder)
    return {**before, target.name: hashlib.sha256(damaged(kind, target.read_bytes())).hexdigest()}


def run_cell(kind: str, phase: str, rank: int, checkpoint: Path, workdir: Path,
             limit_s: float = 300) -> Cell:
    """``smpcheck run`` (2 ranks; TP 2 where the phase is ``transform``, which only a TP run
    has) on a copy of ``checkpoint`` in ``workdir`` with ``kind`` planted on ``rank`` at
    ``phase``, judged."""
    cell = Cell(kind, phase, rank)
    tp = 2 if phase == "transform" else 1
    ckpt = Path(shutil.copytree(checkpoint, workdir / "ckpt"))
    reports = workdir / "reports"
    wanted = expected_digests(kind, ckpt, digests(ckpt))
    variables = {"SMPCHECK_DEBUG_FAULT": f"{kind}:{rank}:{phase}",
                 "SMPCHECK_DEBUG_FAULT_MARK": str(workdir / "fault-began")}
    timeout = STALL_TIMEOUT_S if kind == "stall" else 600
    copies = _node_copies()
    start = time.monotonic()
    out = run_cli("run", str(ckpt), "--tp", str(tp), "--report-dir", str(reports),
                  "--timeout", str(timeout), tmp=workdir, env=variables, timeout=limit_s,
                  fresh=kind in LAUNCHER_KINDS, leftovers_fail=False)
    cell.seconds = time.monotonic() - start
    cell.code = out.returncode
    if not (workdir / "fault-began").exists():
        cell.problems.append(f"the fault never fired: the run never entered {phase}")
    _judge(cell, out.stderr, reports / f"smpcheck-smp-tp{tp}.json")
    if digests(ckpt) != wanted:
        cell.problems.append("the checkpoint's bytes changed beyond the planted fault")
    if out.left:
        cell.problems.append(f"processes left: {out.left}")
    copies_left = _node_copies() - copies
    if copies_left:
        cell.problems.append(f"node copies left: {sorted(copies_left)}")
    return cell


def _node_copies() -> set[str]:
    """The node-local checkpoint copies a ``vanish`` makes: in a self-launched run's state
    directory (which its launcher removes), else in the temporary directory."""
    temp = Path(tempfile.gettempdir())
    return {str(p.relative_to(temp)) for pattern in (
        "smpcheck-node-copy-*", "smpcheck-run-*/smpcheck-node-copy-*") for p in temp.glob(pattern)}


def _judge(cell: Cell, stderr: str, json_report: Path) -> None:
    reports = json_report.parent
    if cell.kind == "eio" and cell.code == 0 and json_report.exists():
        cell.note, cell.report = "nothing read after it: passed", "written"
        return
    expected = EXIT_CODES.get(cell.kind, 1)
    if cell.code != expected:
        cell.problems.append(f"exit code {cell.code}, expected {expected}")
    lines = stderr.strip().splitlines()
    cell.sentence = lines[-1] if lines else ""
    if not cell.sentence.startswith("smpcheck: "):
        cell.problems.append(f"the last line is not smpcheck's sentence: {cell.sentence!r}")
    refused = "could not be written" in cell.sentence
    if cell.kind in ("readonly", "full"):
        if not refused:
            cell.problems.append("the sentence does not say the report could not be written")
    elif f"rank {cell.rank}" not in cell.sentence and "ranks" not in cell.sentence:
        cell.problems.append("the sentence names no rank")
    if "Traceback (most recent call last)" in stderr:
        cell.problems.append("a Python traceback reached the terminal")
    partial = [p.name for p in reports.glob(".*.partial")] if reports.exists() else []
    if partial:
        cell.problems.append(f"partial files left in the report directory: {partial}")
    if refused:
        cell.report = cell.sentence.split("could not be written", 1)[1].strip(" :")
    elif json_report.exists():
        try:
            json.loads(json_report.read_text())
            cell.report = "written"
        except ValueError as exc:
            cell.problems.append(f"the JSON report does not parse: {exc}")
    else:
        cell.problems.append("no report, and no sentence saying why")

