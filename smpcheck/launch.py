"""Become one rank of a job: under torchrun or SLURM srun from their environment, or by
launching N local ranks with PyTorch's elastic launcher.

The self-launch never picks a port itself: the c10d rendezvous binds port 0 and the agent's
shared store does too, so the kernel hands each run its own ports and concurrent runs
(``pytest -n auto``) cannot take each other's (a port found free, released and handed on
could be taken in between; ``torchrun --standalone`` works the same way).

Every rank arms a watchdog: at ``timeout`` it prints its own Python stack (all threads) and
exits with 124, so a hang ends with every rank's traceback and no process left behind (the
elastic agent reaps the rest; a SIGTERM from it also dumps the stack first). Self-launched,
the ranks print in rank order (stacks printed at one instant interleave), each then says so in
a file, and none exits before every rank has (at most ``STACK_GRACE_S``): the launcher stops
every rank as soon as one exits and records only that one, so the files are also how the
closing line names every rank that timed out. A self-launched rank also dies with the process
that launched it (``PR_SET_PDEATHSIG``), whatever kills that. The launcher's own error wall
(its log lines, with every rank's traceback embedded) is held back from the terminal and
handed to the caller for the log file.

Self-test knob: with ``SMPCHECK_DEBUG_HANG_RANK=N`` (rank N hangs in wrap) and
``SMPCHECK_DEBUG_HANG_MARK=PATH``, rank N writes the instant it entered its hang to PATH, and
every rank's timeout counts from that instant instead of from the start: a test of the timeout
path then sees rank N inside its hang however slowly the ranks started.
"""

from __future__ import annotations

import ctypes
import datetime
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smpcheck.source import UsageError

TIMED_OUT = 124
_PR_SET_PDEATHSIG = 1
LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher",
                    "torch.multiprocessing")
STACK_GRACE_S = 2.0  # after printing its stack, a timed-out rank waits for the others' stacks
MARK_POLL_S = 0.05  # how often a rank looks for a file it waits on
TIMEOUT_MARKS = "SMPCHECK_TIMEOUT_MARKS"  # set by self_launch: where timed-out ranks say so
DEBUG_HANG_RANK = "SMPCHECK_DEBUG_HANG_RANK"
DEBUG_HANG_MARK = "SMPCHECK_DEBUG_HANG_MARK"


def launcher_world() -> int | None:
    """World size set by torchrun or srun, or None when started bare."""
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK"):
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SLURM_PROCID") is not None and os.environ.get("SLURM_NTASKS"):
        return int(os.environ["SLURM_NTASKS"])
    return None


def _slurm_env() -> None:
    """Translate srun's variables into the ones ``init_process_group`` reads."""
    if os.environ.get("RANK") or os.environ.get("SLURM_PROCID") is None:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True,
                                   capture_output=True, text=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0"))
                                             % 20000))


def arm_watchdog(deadline: float, timeout: float) -> threading.Thread:
    """At wall-clock ``deadline`` (the same instant on every rank): print this rank's stack,
    after the lower ranks' when self-launched, wait until every rank has printed its own (at
    most ``STACK_GRACE_S``), and exit with 124. Under the self-test knob the deadline is
    ``timeout`` after the planted hang."""
    rank = os.environ.get("RANK", "?")
    mark, armed = debug_hang_mark(), time.time()

    def fire() -> None:
        marks = os.environ.get(TIMEOUT_MARKS) if rank.isdigit() else None
        if marks:  # in rank order: stacks printed at the same instant interleave
            _await_marks(marks, range(int(rank)))
        sys.stderr.write(f"[smpcheck] rank {rank}: still running after the {timeout:.0f} s "
                         "timeout; its stack:\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        _stop_sigterm_dump()  # its stack is out: the launcher's SIGTERM now ends it silently
        if marks:  # the first rank to exit makes the launcher stop the others
            _write_atomically(Path(marks) / f"rank{rank}", str(os.getpid()))
            _await_marks(marks, range(int(os.environ.get("WORLD_SIZE", "1"))))
        else:  # under torchrun or srun, ranks leave no word
            time.sleep(STACK_GRACE_S)
        os._exit(TIMED_OUT)

    def watch() -> None:
        at = hang_began(mark, armed) + timeout if mark else deadline
        time.sleep(max(0.0, at - time.time()))
        fire()

    faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)
    watchdog = threading.Thread(target=watch, name="smpcheck-watchdog", daemon=True)
    watchdog.start()
    return watchdog


def _stop_sigterm_dump() -> None:
    try:
        faulthandler.unregister(signal.SIGTERM)
    except (RuntimeError, ValueError):
        pass


def _await_marks(marks: str, ranks: range) -> None:
    """Until each of ``ranks`` has said it timed out (each prints its stack first), at most
    ``STACK_GRACE_S``: a rank whose watchdog cannot run is not waited for longer."""
    end = time.monotonic() + STACK_GRACE_S
    while not set(ranks) <= set(timeout_marks(marks)) and time.monotonic() < end:
        time.sleep(MARK_POLL_S)


def _write_atomically(path: Path, text: str) -> None:
    """Whoever polls for ``path`` finds it whole or not at all."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def timeout_marks(directory: str | os.PathLike) -> dict[int, int]:
    """``{rank: pid}`` of the ranks that have said they timed out."""
    marks = {}
    for path in Path(directory).glob("rank*"):
        try:
            marks[int(path.name[len("rank"):])] = int(path.read_text())
        except (OSError, ValueError):
            continue
    return marks


def with_timed_out_ranks(failures: dict[int, Any], marks: dict[int, int]) -> dict[int, Any]:
    """The launcher's record of failed ranks, by rank, with every rank that timed out: torch's
    launcher records only the first rank to exit and stops the others, so at a timeout its
    record names one rank although every rank timed out. Ranks are local ranks, which are the
    global ones in a self-launch (one node)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    completed = dict(failures)
    for rank, pid in marks.items():
        if rank not in completed:
            completed[rank] = ProcessFailure(local_rank=rank, pid=pid, exitcode=TIMED_OUT,
                                             error_file="")
    return dict(sorted(completed.items()))


def debug_hang_mark() -> Path | None:
    """The self-test's hang mark, only where a hang is planted too."""
    if os.environ.get(DEBUG_HANG_RANK) and os.environ.get(DEBUG_HANG_MARK):
        return Path(os.environ[DEBUG_HANG_MARK])
    return None


def announce_hang() -> None:
    """Self-test knob: the planted hang has begun, now; written where the test and every
    rank's watchdog wait for it."""
    mark = debug_hang_mark()
    if mark is not None:
        _write_atomically(mark, repr(time.time()))


def hang_began(mark: Path, since: float) -> float:
    """Wall-clock instant the planted hang began, once the hanging rank has written it; a mark
    from before ``since`` (this rank's start: the hang needs every rank started) is an earlier
    run's."""
    while True:
        try:
            began = float(mark.read_text())
        except (OSError, ValueError):
            began = since - 1
        if began >= since:
            return began
        time.sleep(MARK_POLL_S)


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hold back what C++ writes to fd 2 (c10d's socket retries print stack dumps); replay it
    only if the block succeeds, so a failure is one sentence, not a wall of native frames."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            raise
        else:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
        finally:
            os.close(saved)


def init_from_env(device: str, rendezvous_timeout: float) -> None:
    """``init_process_group`` from the launcher's variables; an unreachable rendezvous becomes
    a :class:`UsageError` sentence instead of a hang."""
    _slurm_env()
    extra = {}
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        extra["device_id"] = torch.device("cuda", local)  # binds NCCL to this GPU up front
    backend = "nccl" if device.startswith("cuda") else "gloo"
    address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        with quiet_native_stderr():
            dist.init_process_group(backend, **extra,
                                    timeout=datetime.timedelta(seconds=rendezvous_timeout))
    except Exception as exc:  # noqa: BLE001 - the store raises several types
        raise UsageError(f"cannot reach the rendezvous at {address} within "
                         f"{rendezvous_timeout:.0f} s ({type(exc).__name__}): check MASTER_ADDR "
                         "and MASTER_PORT, and that rank 0 is running") from exc


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; else nothing), so a
    launcher killed with SIGKILL leaves no rank behind. torch's spawn asks for SIGINT, which
    a rank blocked in native code (a collective without a timeout) never acts on."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call: nobody will reap us
        os._exit(1)


class _Held(logging.Handler):
    """Keeps what the launcher logs, formatted, for the log file."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def held_launcher_logs() -> Iterator[list[str]]:
    """Inside, torch elastic's and torch.multiprocessing's log lines go to the yielded list
    instead of the terminal."""
    handler = _Held()
    loggers = [logging.getLogger(name) for name in LAUNCHER_LOGGERS]
    saved = [(log.propagate, log.level) for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        for log, (propagate, level) in zip(loggers, saved):
            log.removeHandler(handler)
            log.propagate, log.level = propagate, level


def self_launch(nproc: int, entry: Callable[..., int], args: tuple) -> dict[int, Any]:
    """Run ``entry(*args)`` on ``nproc`` local ranks through torch's elastic launcher; the
    rendezvous binds a port of its own (port 0). A failed run raises ``ChildFailedError``
    with every rank that timed out among its failures."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
                          run_id=uuid.uuid4().hex[:8], max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    os.environ["SMPCHECK_SELF_LAUNCHED"] = "1"
    if nproc > 1:  # as torchrun does: N ranks with a thread per core each oversubscribe
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="smpcheck-timeouts-") as marks:
        os.environ[TIMEOUT_MARKS] = marks  # the ranks inherit it
        try:
            return elastic_launch(config, entry)(*args)
        except ChildFailedError as exc:
            raise ChildFailedError(exc.name, with_timed_out_ranks(
                exc.failures, timeout_marks(marks))) from None
        finally:
            os.environ.pop(TIMEOUT_MARKS, None)
