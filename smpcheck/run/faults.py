"""Planted faults, for the fault-injection campaign (``tests/test_faults.py``,
``benchmarks/fault_campaign.py``): how a run ends when a cluster misbehaves under it.

``SMPCHECK_DEBUG_FAULT=KIND:RANK:PHASE`` makes rank ``RANK`` meet fault ``KIND`` as it enters
``PHASE``: a phase of the run (``start``, ``load``, ``transform``, ``wrap``, ``check``,
``forward``, ``report``) or a check's name (``coverage``). The kinds are the ways jobs on
clusters die:

========  =====================================================================================
raise     an exception (the job's failure path)
hang      a Python loop that never returns (the watchdog's path)
kill      SIGKILL to this rank, as the kernel's OOM killer sends it
preempt   SIGTERM to the whole job (its process group), as a scheduler's preemption sends it
stall     SIGSTOP to this rank: alive, answering nothing, its watchdog frozen with it
truncate  the checkpoint's largest file cut to half its length while ranks read it
replace   that file replaced (renamed over) by one with the same header and other bytes
eio       every later open of a checkpoint file on this rank fails with EIO
readonly  from then on, every write under the report directory fails with EROFS, in every
          process (the directory is shared: the rank is ignored)
full      the same with ENOSPC
vanish    this rank's own copy of the checkpoint (made at start, as another node's local disk
          holds one) deleted
========  =====================================================================================

With ``SMPCHECK_DEBUG_FAULT_MARK=PATH`` a fault writes the instant it fired to PATH (so a test
knows it fired at all: a phase a run never enters plants nothing), and under a ``hang`` or
``stall`` every rank's watchdog counts its timeout from that instant (:mod:`smpcheck.run.launch`),
so a test of the timeout path sees the rank inside its fault however slowly ranks started.
The file damage is :func:`damaged`, so a test can compute what the file must hold afterwards.
Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import util
from pathlib import Path

from smpcheck.report.files import write_atomically

FAULT = "SMPCHECK_DEBUG_FAULT"
FAULT_MARK = "SMPCHECK_DEBUG_FAULT_MARK"
KINDS = ("raise", "hang", "kill", "preempt", "stall", "truncate", "replace", "eio", "readonly",
         "full", "vanish")
FILE_KINDS = ("truncate", "replace")  # damage the checkpoint itself
REPORT_KINDS = {"readonly": errno.EROFS, "full": errno.ENOSPC}
WAITING_KINDS = ("hang", "stall")  # the timeout counts from their mark


@dataclass(frozen=True)
class Planted:
    kind: str
    rank: int
    phase: str


@dataclass
class _Armed:
    planted: Planted
    checkpoint: Path | None = None
    report_dir: Path | None = None
    fired: bool = False


_armed: _Armed | None = None


def planted() -> Planted | None:
    """The fault the environment plants, if any (a malformed value is an error, not ignored)."""
    value = os.environ.get(FAULT)
    if not value:
        return None
    kind, _, rest = value.partition(":")
    rank, _, phase = rest.partition(":")
    if kind not in KINDS or not rank.isdigit() or not phase:
        raise ValueError(f"{FAULT}={value!r}: expected KIND:RANK:PHASE, KIND one of "
                         f"{', '.join(KINDS)}")
    return Planted(kind, int(rank), phase)


def arm(rank: int, checkpoint: str | os.PathLike, report_dir: str | os.PathLike,
        scratch: str | None = None) -> Path:
    """Get ready on this rank; returns the checkpoint path the rank must read (its own copy
    under ``vanish``, made in ``scratch`` if given, else in the temporary directory)."""
    global _armed
    fault = planted()
    checkpoint = Path(checkpoint)
    if fault is None:
        return checkpoint
    _armed = _Armed(fault, checkpoint, Path(report_dir))
    if fault.kind == "vanish" and fault.rank == rank and checkpoint.is_dir():
        # Removed at the rank's own exit (a multiprocessing child leaves by _exit: it never
        # runs atexit); a rank stopped by a signal runs nothing, so a self-launch's copy goes
        # in its run-state directory (``scratch``), which the launcher removes.
        copy = Path(tempfile.mkdtemp(prefix=f"smpcheck-node-copy-rank{rank}-", dir=scratch))
        util.Finalize(None, shutil.rmtree, args=(copy,), kwargs={"ignore_errors": True},
                      exitpriority=0)
        _armed.checkpoint = Path(shutil.copytree(checkpoint, copy / checkpoint.name))
    return _armed.checkpoint


def arm_launcher(report_dir: str | os.PathLike) -> None:
    """The launching process: a report directory that turned read-only or full is so for it
    too (it writes only after every rank ended, so after any phase the fault names)."""
    fault = planted()
    if fault is not None and fault.kind in REPORT_KINDS:
        _fail_opens(Path(report_dir), REPORT_KINDS[fault.kind], writes=True)


def arrive(rank: int, phase: str) -> None:
    """This rank enters ``phase``: the planted fault fires here, once."""
    if _armed is None or _armed.fired:
        return
    fault = _armed.planted
    if fault.phase != phase or (fault.rank != rank and fault.kind not in REPORT_KINDS):
        return
    _armed.fired = True
    _announce()
    _FIRE[fault.kind](_armed)


def timeout_mark() -> Path | None:
    """Where a planted hang or stall says when it began, if one is planted with a mark."""
    try:
        fault = planted()
    except ValueError:
        return None
    if fault and fault.kind in WAITING_KINDS and os.environ.get(FAULT_MARK):
        return Path(os.environ[FAULT_MARK])
    return None


def _announce() -> None:
    """The planted fault fires now: said where the test (and, for a hang or a stall, every
    rank's watchdog) waits for it."""
    if os.environ.get(FAULT_MARK):
        write_atomically(Path(os.environ[FAULT_MARK]), repr(time.time()))


def largest_file(checkpoint: Path) -> Path:
    """The file ``truncate`` and ``replace`` damage: the largest safetensors file."""
    files = sorted(checkpoint.glob("*.safetensors"), key=lambda p: (-p.stat().st_size, p.name))
    if not files:
        raise FileNotFoundError(f"no safetensors file in {checkpoint} to damage")
    return files[0]


def damaged(kind: str, data: bytes) -> bytes:
    """What ``truncate`` or ``replace`` leaves in place of a file holding ``data``:
    half of it, or the same header (its first 8 bytes say how long) with every later byte
    flipped."""
    if kind == "truncate":
        return data[:len(data) // 2]
    header = 8 + int.from_bytes(data[:8], "little")
    return data[:header] + bytes(b ^ 0x55 for b in data[header:])


def _damage(armed: _Armed) -> None:
    target = largest_file(armed.checkpoint)
    if armed.planted.kind == "truncate":
        os.truncate(target, target.stat().st_size // 2)
        return
    replacement = target.with_name(f".{target.name}.replacement")
    replacement.write_bytes(damaged("replace", target.read_bytes()))
    os.replace(replacement, target)


def _under(path: object, root: Path) -> bool:
    if isinstance(path, int):  # a file descriptor: already open
        return False
    try:
        return Path(os.fsdecode(path)).absolute().is_relative_to(root.absolute())
    except (TypeError, ValueError):
        return False


def _fail_opens(root: Path, code: int, *, writes: bool) -> None:
    """From now on, ``open`` of a path under ``root`` (for writing, or for anything) raises
    ``OSError(code)``, and so does ``safetensors.safe_open`` wherever it was imported."""
    real_open = io.open

    def failing_open(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if _under(file, root) and (writing or not writes):
            raise OSError(code, os.strerror(code), os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = failing_open
    if writes:
        return
    import safetensors

    real_safe_open = safetensors.safe_open

    def failing_safe_open(filename, *args, **kwargs):
        if _under(filename, root):
            raise OSError(code, os.strerror(code), os.fsdecode(filename))
        return real_safe_open(filename, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "safe_open", None) is real_safe_open:
            module.safe_open = failing_safe_open


def _raise(armed: _Armed) -> None:
    fault = armed.planted
    raise RuntimeError(f"planted failure on rank {fault.rank} in {fault.phase} ({FAULT})")


def _hang(armed: _Armed) -> None:
    while True:
        time.sleep(1)


def _kill(armed: _Armed) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _preempt(armed: _Armed) -> None:
    os.killpg(os.getpgid(0), signal.SIGTERM)
    time.sleep(60)  # the signal ends this process too


def _stall(armed: _Armed) -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def _eio(armed: _Armed) -> None:
    _fail_opens(armed.checkpoint, errno.EIO, writes=False)


def _report_fault(armed: _Armed) -> None:
    _fail_opens(armed.report_dir, REPORT_KINDS[armed.planted.kind], writes=True)


def _vanish(armed: _Armed) -> None:
    shutil.rmtree(armed.checkpoint)


_FIRE = {"raise": _raise, "hang": _hang, "kill": _kill, "preempt": _preempt, "stall": _stall,
         "truncate": _damage, "replace": _damage, "eio": _eio, "readonly": _report_fault,
         "full": _report_fault, "vanish": _vanish}
