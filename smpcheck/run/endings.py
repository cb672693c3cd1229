"""How a self-launched run ended when no rank could say so itself: a rank killed by a signal,
ranks that timed out, a rank that answered nothing, the job preempted. Made from the
launcher's record of each rank's exit and from where each rank last said it was
(:mod:`smpcheck.run.whereabouts`), in the launching process, which then writes the report.

The exit codes of ``smpcheck run``: 0 every check passed; 1 a check failed, a rank failed,
died or timed out; 2 bad usage or input; 3 every check passed but the report could not be
written; 128 + N the job was stopped by signal N (143: SIGTERM, as a scheduler preempts).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from smpcheck.run.failures import EXIT_FAILED, RankFailure, is_peer_loss
from smpcheck.run.launch import TIMED_OUT
from smpcheck.run.whereabouts import describe

EXIT_NO_REPORT = 3
# What a signal that ended a rank most likely means, for the sentence.
SIGNAL_CAUSES = {
    signal.SIGKILL: "the kernel's out-of-memory killer sends SIGKILL: see `dmesg`",
    signal.SIGBUS: "a memory-mapped file shrank or could not be read: was a checkpoint file "
                   "truncated or replaced, or is its disk failing?",
    signal.SIGSEGV: "a crash in native code: its stack is in the log",
    signal.SIGABRT: "native code aborted: its message is in the log",
    signal.SIGTERM: "something outside the job stopped it",
}


@dataclass
class Ending:
    """The run's exit code, the closing sentence, and one record per rank for the report."""

    code: int
    sentence: str
    failures: list[RankFailure] = field(default_factory=list)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _phase(where: dict[int, dict], rank: int) -> str:
    return describe(where[rank]) if rank in where else "start"


def _first_line(message: Any) -> str:
    if isinstance(message, dict):  # the error file @record wrote: {'message': ..., ...}
        message = message.get("message", "")
    return next((line.strip() for line in str(message).splitlines() if line.strip()), "")


def of_failed_ranks(failures: dict[int, Any], where: dict[int, dict], silent: dict[int, dict],
                    timeout: float, log: str) -> Ending:
    """From the launcher's ``{rank: ProcessFailure}`` (every rank that timed out included),
    ``where`` each rank last was, and the ``silent`` ranks (no stack at the timeout)."""
    if any(f.exitcode == EXIT_NO_REPORT for f in failures.values()):
        return Ending(EXIT_NO_REPORT, "")
    timed_out = sorted(r for r, f in failures.items() if f.exitcode == TIMED_OUT)
    if timed_out:
        return _timeout(timed_out, where, silent, timeout)
    rank, failure = min(failures.items(), key=lambda item: (
        is_peer_loss(str(item[1].message)), item[1].timestamp, item[0]))
    phase = _phase(where, rank)
    if failure.exitcode < 0:
        name = signal_name(-failure.exitcode)
        cause = SIGNAL_CAUSES.get(-failure.exitcode, "")
        record = RankFailure(rank, phase, name, f"killed by {name}" + (f" ({cause})"
                                                                       if cause else ""), "")
        return Ending(EXIT_FAILED, f"rank {rank} was {record.message} in {phase}, before a "
                      "report was written", [record])
    first = _first_line(failure.message) or "see its output above"
    record = RankFailure(rank, phase, f"exit code {failure.exitcode}", first, "")
    return Ending(EXIT_FAILED, f"rank {rank} failed (exit code {failure.exitcode}) in {phase} "
                  f"before a report was written: {first}; the launcher's messages are in {log}",
                  [record])


def _timeout(timed_out: list[int], where: dict[int, dict], silent: dict[int, dict],
             timeout: float) -> Ending:
    records = [RankFailure(r, _phase(where, r), "Timeout",
                           f"still running after --timeout {timeout:.0f} s", "")
               for r in timed_out]
    sentence = (f"ranks {timed_out} were still running after --timeout {timeout:.0f} s and "
                "were stopped; each rank's stack is printed above")
    quiet = sorted(r for r in silent if r not in timed_out)
    if quiet:
        said = ", ".join(f"rank {r} in {_phase(where, r)}" for r in quiet)
        sentence += (f"; {said} answered nothing (no stack: stopped, or stuck outside Python) "
                     f"and {'was' if len(quiet) == 1 else 'were'} killed")
        records += [RankFailure(r, _phase(where, r), "NoAnswer", "answered nothing at the "
                                "timeout (stopped, or stuck outside Python); killed", "")
                    for r in quiet]
    return Ending(EXIT_FAILED, sentence, records)


def of_signalled_job(signum: int, where: dict[int, dict]) -> Ending:
    """The launching process itself got ``signum`` (a scheduler preempting or cancelling the
    job sends SIGTERM to all of it): the ranks were stopped wherever they were."""
    name = signal_name(signum)
    places = ", ".join(f"rank {r} in {_phase(where, r)}" for r in sorted(where)) or "starting"
    records = [RankFailure(r, _phase(where, r), name, f"stopped by {name} sent to the job", "")
               for r in sorted(where)]
    return Ending(128 + signum, f"the job was stopped by {name} (preempted or cancelled) with "
                  f"{places}; no check verdict", records)
