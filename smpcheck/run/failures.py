"""A rank that fails mid-run still ends the run with a report, and every rank stops.

Without this, an exception on one rank (a recipe's validator in ``wrap``, a load that cannot
read a tensor) ends in the launcher's error wall, with its peers stuck in a collective the
failed rank never joins, and no report. Instead the ranks talk through the c10d store of the
default group, which outlives any rank (under torchrun and the self-launch the elastic agent
hosts it). Each rank uses its own clone of the store (its own connection), so a thread can
use it while the main thread sits in a collective or in a store wait.

::

    failing rank                      rank 0 (the writer)                 every other rank
    catch the exception in phase P
    post a record: rank, phase,  -->  its watcher sees "failed"           its watcher sees
      exception, traceback, tensors   waits COLLECT_S for more records,     "failed"
    wait for "reported"               writes report + log, "reported" --> waits for "reported"
    exit 1                            exit 1                              exit 1

Rank 0 writes whether it failed itself (its main thread, after catching) or is a bystander
(its watcher thread, while its main thread may be blocked in a collective); a lock makes one
of them write. A rank waits for the report before exiting because the launcher kills every
rank as soon as one exits non-zero: were a failed rank to exit first, rank 0 would be killed
before it wrote anything. Once a rank knows of a failure it stops dumping its stack on
SIGTERM, so the launcher's clean-up is silent. A rank that waits longer than
``REPORT_GRACE_S`` (rank 0 died without a word) exits anyway, and the parent falls back to
the launcher's record of who failed.

The report holds one FAIL line per failed phase, named after the phase, naming the rank that
caused it (the earliest failure that is not a peer merely losing its connection) and the
exception in one sentence (the other ranks that failed there by number); a recipe's
``ParamInitError`` (``name: problem`` lines) becomes a finding per tensor. Every traceback goes
to the JSON report (``CheckResult.traceback``) and to the log beside it.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from smpcheck.report.model import CheckResult, Finding, Status

POLL_S = 0.25  # how often a watcher looks at the store (a cheap check on its own connection)
COLLECT_S = 1.0  # how long rank 0 waits for more ranks to post after the first failure
JOIN_S = 5.0  # how long leaving the watched block waits for the watcher's last store call
REPORT_GRACE_S = 30.0  # how long a rank waits for rank 0's report before exiting anyway
EXIT_FAILED = 1
_PEER_LOSS = ("remote worker", "Connection closed by peer", "Connection reset by peer",
              "Broken pipe")


def is_peer_loss(message: str) -> bool:
    """True for the error a rank gets when a *peer* went away (gloo says so in words)."""
    return any(words in message for words in _PEER_LOSS)


def tensor_problems(message: str) -> list[tuple[str, str]]:
    """``(tensor, problem)`` from a message whose lines after the first are ``name: problem``
    (the recipe's ``ParamInitError``)."""
    pairs = []
    for line in message.splitlines()[1:]:
        name, sep, problem = line.strip().partition(": ")
        if sep and name and " " not in name:
            pairs.append((name, problem))
    return pairs


@dataclass
class RankFailure:
    """What one rank posts when it fails: small, JSON in the store."""

    rank: int
    phase: str
    error: str  # the exception's type name
    message: str
    traceback: str
    at: float = field(default_factory=time.time)
    tensors: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_exception(cls, rank: int, phase: str, exc: BaseException,
                       tensors: list[tuple[str, str]] | None = None) -> RankFailure:
        return cls(rank, phase, type(exc).__name__, str(exc),
                   "".join(traceback.format_exception(exc)), tensors=tensors or [])

    @property
    def peer_loss(self) -> bool:
        return is_peer_loss(self.message)

    @property
    def summary(self) -> str:
        """The exception's first line, without a leading ``rank N:`` (the report says it)."""
        first = next((line.strip() for line in self.message.splitlines() if line.strip()), "")
        if first.startswith(f"rank {self.rank}: "):
            first = first[len(f"rank {self.rank}: "):]
        first = first.rstrip(":")
        return f"{self.error}: {first}" if first else self.error


class FailureBoard:
    """The failure records of one run, in the store (keys under ``smpcheck/<restart>/``)."""

    def __init__(self, store: Any, world_size: int) -> None:
        self._store = store
        self.world_size = world_size

    @classmethod
    def of_default_group(cls) -> FailureBoard:
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        try:
            store = store.clone()  # its own connection: usable while the main thread waits
        except (NotImplementedError, RuntimeError):
            pass  # a FileStore needs none
        prefix = f"smpcheck/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        return cls(dist.PrefixStore(prefix, store), dist.get_world_size())

    def post(self, failure: RankFailure) -> None:
        self._store.set(f"rank{failure.rank}", json.dumps(asdict(failure)))
        self._store.add("failed", 1)  # after the record: whoever sees the count finds it

    def any_failed(self) -> bool:
        return self._store.check(["failed"])

    def failures(self) -> list[RankFailure]:
        keys = [f"rank{r}" for r in range(self.world_size)]
        return [_failure(json.loads(self._store.get(k))) for k in keys if self._store.check([k])]

    def mark_reported(self) -> None:
        self._store.set("reported", "1")

    def reported(self) -> bool:
        return self._store.check(["reported"])


def _failure(data: dict) -> RankFailure:
    return RankFailure(**{**data, "tensors": [tuple(t) for t in data.get("tensors", [])]})


class FailureProtocol:
    """This rank's side: post its own failure, watch for a peer's, end the run with a report.

    Args:
        board: the run's failure records.
        rank: this rank.
        write_report: called on rank 0 only, once, with every posted failure.
    """

    def __init__(self, board: FailureBoard, rank: int,
                 write_report: Callable[[list[RankFailure]], None]) -> None:
        self.board = board
        self.rank = rank
        self._write_report = write_report
        self._lock = threading.Lock()
        self._written = False
        self._stop = threading.Event()

    @contextmanager
    def watching(self) -> Iterator[FailureProtocol]:
        """Watch for a peer's failure while the block runs (a daemon thread)."""
        watcher = threading.Thread(target=self._watch, name="smpcheck-failure-watcher",
                                   daemon=True)
        watcher.start()
        try:
            yield self
        finally:
            self._stop.set()
            # Left running, the watcher may be inside a store call when the interpreter
            # exits; taking the GIL back then aborts the rank ("terminate called without an
            # active exception") after a run that passed. Its calls take milliseconds.
            watcher.join(timeout=JOIN_S)

    def fail(self, failure: RankFailure) -> NoReturn:
        """Post this rank's failure and end the run (never returns)."""
        try:
            self.board.post(failure)
        except Exception:  # noqa: BLE001 - the store is gone; the exit code still tells
            pass
        self._end_run()

    def finish(self, write: Callable[[], None]) -> None:
        """Rank 0, no failure seen: write the report unless a failure report got there first,
        and let any rank that failed after the last collective stop waiting."""
        with self._lock:
            if self._written:
                return
            write()
            self._written = True
            self.board.mark_reported()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                failed = self.board.any_failed()
            except Exception:  # noqa: BLE001 - the store's host is gone (srun's rank 0 ended):
                return  # the launcher or the timeout ends a rank left stuck
            if failed and not self._stop.is_set():
                self._end_run()

    def _end_run(self) -> NoReturn:
        _stop_sigterm_dump()
        try:
            if self.rank == 0:
                self._write_once()
            else:
                self._await_report()
        finally:
            _exit_quietly()

    def _write_once(self) -> None:
        with self._lock:  # the main thread and the watcher may both get here
            if self._written:
                return
            time.sleep(COLLECT_S)  # ranks failing in the same phase post within this
            try:
                self._write_report(self.board.failures())
            except Exception as exc:  # noqa: BLE001 - say so, and still stop every rank
                print(f"[smpcheck] the failure report could not be written: {exc}",
                      file=sys.stderr)
            self._written = True
            self.board.mark_reported()

    def _await_report(self) -> None:
        deadline = time.monotonic() + REPORT_GRACE_S
        while time.monotonic() < deadline:
            try:
                if self.board.reported():
                    return
            except Exception:  # noqa: BLE001 - store gone with rank 0
                return
            time.sleep(POLL_S)


def _stop_sigterm_dump() -> None:
    try:
        faulthandler.unregister(signal.SIGTERM)
    except (RuntimeError, ValueError):
        pass


def _exit_quietly() -> NoReturn:
    """``os._exit`` (a thread cannot end a main thread stuck in a collective otherwise), after
    what a normal exit would do that others see: flushed output, and multiprocessing's
    semaphores released (tqdm makes one; left over, the launcher warns of a leak)."""
    from multiprocessing import util

    try:
        util._run_finalizers(0)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FAILED)


# -- the report ---------------------------------------------------------------------------

def cause(failures: list[RankFailure]) -> RankFailure:
    """The failure that started it: not a peer loss if any is not, then the earliest."""
    return min(failures, key=lambda f: (f.peer_loss, f.at, f.rank))


def failure_results(failures: list[RankFailure]) -> list[CheckResult]:
    """One FAIL line per failed phase, the phase of the first cause first."""
    by_phase: dict[str, list[RankFailure]] = {}
    for f in sorted(failures, key=lambda f: (f.peer_loss, f.at, f.rank)):
        by_phase.setdefault(f.phase, []).append(f)
    return [_phase_result(phase, group) for phase, group in by_phase.items()]


def _phase_result(phase: str, group: list[RankFailure]) -> CheckResult:
    first = cause(group)
    others = sorted(f.rank for f in group if f is not first)
    message = f"rank {first.rank} failed in {phase}: {first.summary}"
    if others:
        message += f" (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} too)"
    findings: dict[tuple[str, str], Finding] = {}
    for f in group:
        for tensor, problem in f.tensors:
            finding = findings.setdefault((tensor, problem), Finding(tensor, [], problem))
            finding.ranks.append(f.rank)
    return CheckResult(phase, Status.FAIL, message, list(findings.values()),
                       traceback=failure_log(group))


def failure_log(failures: list[RankFailure]) -> str:
    """Every failed rank's traceback, in the order they failed."""
    return "\n".join(f"--- rank {f.rank}, phase {f.phase}, at "
                     f"{time.strftime('%H:%M:%S', time.localtime(f.at))}\n{f.traceback}"
                     for f in sorted(failures, key=lambda f: (f.at, f.rank)))
