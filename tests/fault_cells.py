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
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from smpcheck.run.faults import damaged, largest_file

SMPCHECK = shutil.which("smpcheck") or "smpcheck"
TAG = "SMPCHECK_TEST_TAG"
KINDS = ("kill", "preempt", "stall", "truncate", "replace", "eio", "readonly", "full", "vanish")
CHECKS = ("preflight", "config_parity", "initialised", "rank_parity", "checkpoint_parity",
          "coverage", "fresh_init", "masters", "tp_shards", "forward", "tp_numerics", "memory")
PHASES = ("start", "load", "transform", "wrap", *CHECKS, "report")
EXIT_CODES = {"preempt": 128 + signal.SIGTERM, "readonly": 3, "full": 3}
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


def leftovers(tag: str, wait: float = 5.0) -> list[psutil.Process]:
    """Processes of the run tagged ``tag`` still alive after ``wait`` s (killed, then named)."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not alive or time.monotonic() > deadline:
            for proc in alive:
                proc.kill()
            return alive
        time.sleep(0.2)


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
    tag = uuid.uuid4().hex
    env = {**os.environ, "SMPCHECK_DEBUG_FAULT": f"{kind}:{rank}:{phase}",
           "SMPCHECK_DEBUG_FAULT_MARK": str(workdir / "fault-began"), TAG: tag,
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    timeout = STALL_TIMEOUT_S if kind == "stall" else 600
    command = [SMPCHECK, "run", str(ckpt), "--tp", str(tp), "--report-dir", str(reports),
               "--timeout", str(timeout)]
    start = time.monotonic()
    # Its own session: a preemption signals the whole process group, and this is not in it.
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir,
                         timeout=limit_s, start_new_session=True)
    cell.seconds = time.monotonic() - start
    cell.code = out.returncode
    if not (workdir / "fault-began").exists():
        cell.problems.append(f"the fault never fired: the run never entered {phase}")
    _judge(cell, out.stderr, reports / f"smpcheck-smp-tp{tp}.json")
    if digests(ckpt) != wanted:
        cell.problems.append("the checkpoint's bytes changed beyond the planted fault")
    left = leftovers(tag)
    if left:
        cell.problems.append(f"processes left: {[p.pid for p in left]}")
    return cell


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

