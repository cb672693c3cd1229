"""Become one rank of a job: under torchrun or SLURM srun from their environment, or by
launching N local ranks with PyTorch's elastic launcher.

The self-launch never picks a port itself: the c10d rendezvous binds port 0 and the agent's
shared store does too, so the kernel hands each run its own ports and concurrent runs
(``pytest -n auto``) cannot take each other's (a port found free, released and handed on
could be taken in between; ``torchrun --standalone`` works the same way).

Every rank arms a watchdog: at ``timeout`` it prints its own Python stack (all threads) and
exits with 124, so a hang ends with every rank's traceback and no process left behind (the
elastic agent reaps the rest; a SIGTERM from it also dumps the stack first). Self-launched,
the ranks share a run-state directory (``SMPCHECK_RUN_STATE``): each says there which phase it
is in (:mod:`smpcheck.run.whereabouts`) and, at a timeout, that it timed out. They print in rank
order (stacks printed at one instant interleave) and none exits before every rank has (at
most ``STACK_GRACE_S``): the launcher stops every rank as soon as one exits and records only
that one, so the files are also how the closing line names every rank that timed out. A rank
that printed nothing by then (stopped, or stuck outside Python) is SIGKILLed by the others, so
the launcher need not wait out its own grace period on it. A self-launched rank also dies with
the process that launched it (``PR_SET_PDEATHSIG``), whatever kills that. The launcher's own
error wall (its log lines, with every rank's traceback embedded) is held back from the
terminal and handed to the caller for the log file.

Self-test knob: a planted ``hang`` or ``stall`` (:mod:`smpcheck.run.faults`) with a mark file
writes the instant it began, and every rank's timeout counts from that instant instead of from
the start: a test of the timeout path then sees the rank inside its fault however slowly the
ranks started.
"""

from __future__ import annotations

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

from smpcheck.checkpoint.source import UsageError
from smpcheck.report.files import write_atomically
from smpcheck.run import faults, forks
from smpcheck.run.whereabouts import RUN_STATE, last_known

TIMED_OUT = 124
LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher",
                    "torch.multiprocessing")
STACK_GRACE_S = 2.0  # after printing its stack, a timed-out rank waits for the others' stacks
MARK_POLL_S = 0.05  # how often a rank looks for a file it waits on
_TIMED_OUT_PREFIX = "timed-out-rank"
SIGTERM_STACK_PREFIX = "sigterm-stack-rank"


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
    mark, armed = faults.timeout_mark(), time.time()

    def fire() -> None:
        marks = os.environ.get(RUN_STATE) if rank.isdigit() else None
        if marks:  # in rank order: stacks printed at the same instant interleave
            _await_marks(marks, range(int(rank)))
        sys.stderr.write(f"[smpcheck] rank {rank}: still running after the {timeout:.0f} s "
                         "timeout; its stack:\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        _stop_sigterm_dump()  # its stack is out: the launcher's SIGTERM now ends it silently
        if marks:  # the first rank to exit makes the launcher stop the others
            write_atomically(Path(marks) / f"{_TIMED_OUT_PREFIX}{rank}", str(os.getpid()))
            _await_marks(marks, range(int(os.environ.get("WORLD_SIZE", "1"))))
            _kill_silent_ranks(marks)
        else:  # under torchrun or srun, ranks leave no word
            time.sleep(STACK_GRACE_S)
        os._exit(TIMED_OUT)

    def watch() -> None:
        at = hang_began(mark, armed) + timeout if mark else deadline
        time.sleep(max(0.0, at - time.time()))
        fire()

    faulthandler.register(signal.SIGTERM, file=_sigterm_stack_file(rank), all_threads=True,
                          chain=True)
    watchdog = threading.Thread(target=watch, name="smpcheck-watchdog", daemon=True)
    watchdog.start()
    return watchdog


_held_open: list[Any] = []  # faulthandler writes to the file's descriptor: keep it open


def _sigterm_stack_file(rank: str) -> Any:
    """Where a rank's stack goes when SIGTERM ends it (the launcher stopping it after a peer
    died, or a preemption): self-launched, a file the launching process puts in the log, so
    the terminal ends with one sentence; under torchrun or srun, stderr."""
    state = os.environ.get(RUN_STATE)
    if not state or not rank.isdigit():
        return sys.stderr
    _held_open.append(open(Path(state) / f"{SIGTERM_STACK_PREFIX}{rank}", "w"))  # noqa: SIM115
    return _held_open[-1]


def sigterm_stacks(state: str | os.PathLike) -> dict[int, str]:
    """``{rank: stack}`` of the ranks SIGTERM stopped, from :func:`_sigterm_stack_file`."""
    stacks = {}
    for path in Path(state).glob(f"{SIGTERM_STACK_PREFIX}*"):
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            continue
        if text:
            stacks[int(path.name[len(SIGTERM_STACK_PREFIX):])] = text
    return dict(sorted(stacks.items()))


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


def timeout_marks(directory: str | os.PathLike) -> dict[int, int]:
    """``{rank: pid}`` of the ranks that have said they timed out."""
    marks = {}
    for path in Path(directory).glob(f"{_TIMED_OUT_PREFIX}*"):
        try:
            marks[int(path.name[len(_TIMED_OUT_PREFIX):])] = int(path.read_text())
        except (OSError, ValueError):
            continue
    return marks


def silent_ranks(directory: str | os.PathLike) -> dict[int, dict]:
    """Where each rank that did not say it timed out last was (``{rank: whereabouts}``)."""
    said = timeout_marks(directory)
    return {r: w for r, w in last_known(directory).items() if r not in said}


def _kill_silent_ranks(directory: str) -> None:
    """SIGKILL the ranks that printed no stack by the end of the grace period: a stopped
    process takes no SIGTERM, and the launcher would wait out its own grace on it."""
    for where in silent_ranks(directory).values():
        try:
            os.kill(int(where["pid"]), signal.SIGKILL)
        except (OSError, KeyError, ValueError):
            continue


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


def self_launch(nproc: int, entry: Callable[..., int], args: tuple,
                state: str) -> dict[int, Any]:
    """Run ``entry(*args)`` on ``nproc`` local ranks through torch's elastic launcher; the
    rendezvous binds a port of its own (port 0). The ranks share the run-state directory
    ``state``, which the caller reads afterwards (:func:`silent_ranks`,
    :func:`smpcheck.run.whereabouts.last_known`). A failed run raises ``ChildFailedError`` with
    every rank that timed out among its failures."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
                          run_id=uuid.uuid4().hex[:8], max_restarts=0, monitor_interval=0.1,
                          start_method="forkserver")
    os.environ["SMPCHECK_SELF_LAUNCHED"] = "1"
    os.environ[RUN_STATE] = state  # handed to the ranks with smpcheck's other variables
    threads = 1 if nproc > 1 and "OMP_NUM_THREADS" not in os.environ else None
    forks.context()  # a warm fork server, restarted if the environment changed under it
    try:
        return elastic_launch(config, _forked_rank)(
            entry, forks.own_environment(), forks.launcher_streams(), threads, *args)
    except ChildFailedError as exc:
        raise ChildFailedError(exc.name, with_timed_out_ranks(
            exc.failures, timeout_marks(state))) from None
    finally:
        os.environ.pop(RUN_STATE, None)


def _forked_rank(entry: Callable[..., int], own: dict[str, str], streams: list,
                 threads: int | None, *args: Any) -> int:
    """A self-launched rank, forked from the warm server: it takes the launcher's variables
    and streams as they were at this launch, then runs ``entry(*args)``. ``threads``: one
    intra-op thread per rank when several share the machine and the user set none, as torchrun
    does (N ranks with a thread per core each would oversubscribe it)."""
    forks.adopt_environment(own)
    forks.adopt_streams(streams)
    if threads:
        torch.set_num_threads(threads)
    return entry(*args)
