"""What each rank does for ``smpcheck run``: the strategy's phases under the memory monitor,
then every check, then (rank 0) the reports. Returns the exit code every rank agrees on.

An exception on any rank, in any phase, ends the run through :mod:`smpcheck.run.failures`: the
report is written anyway, with the failed phase as a FAIL line, and every rank exits 1. A
report directory that cannot be written (read-only, full) ends the run with the verdict in
one sentence on stderr and exit 3 when the checks passed (1 when they failed). A checkpoint
that changed while the ranks read it (truncated, replaced, rewritten, deleted on one node)
fails the run, whatever the checks found: their comparisons read a moving target.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from reference_impl import ParamInitError
from smpcheck.checkpoint import Checkpoint, changed_files, file_identities
from smpcheck.checks import ALL_CHECKS
from smpcheck.checks.base import is_collective
from smpcheck.checks.forward import reference_outputs
from smpcheck.memory import MemoryMonitor, memory_bound, warm_up
from smpcheck.memory.phases import (
    CHECK,
    FORWARD,
    LOAD,
    REPORT,
    START,
)
from smpcheck.report.files import write_atomically
from smpcheck.report.model import CheckResult, Finding, Report, Status
from smpcheck.report.writers import write_reports
from smpcheck.run import faults, whereabouts
from smpcheck.run.endings import EXIT_NO_REPORT
from smpcheck.run.failures import (
    EXIT_FAILED,
    FailureBoard,
    FailureProtocol,
    RankFailure,
    failure_log,
    failure_results,
    tensor_problems,
)
from smpcheck.strategies import STRATEGIES, RunOptions
from smpcheck.strategies.base import load_kwargs
from smpcheck.verify import verify

MIB = 2**20
UNCHANGED = "checkpoint_unchanged"  # the result a checkpoint that moved under the run fails
# Growth any run shows whatever the model: lazily imported modules on the host; on CUDA also
# kernel images loaded on first use (measured on an H200: +70 MiB loading a 0.4 MiB model).
CPU_SLACK = 64 * MIB
CUDA_SLACK = 256 * MIB
DENSE_NUMERICS_LIMIT = 1 << 30  # a dense copy per rank for tp_numerics only below 1 GiB
# The checks that read and compare (the "check" phase), and those that run a forward pass
# through the wrapped model (the "forward" phase: it unshards as a training step does, so its
# memory is measured apart); memory comes last, judging both.
CHECKS = [n for n, c in ALL_CHECKS.items() if n != "memory" and not is_collective(c)]
FORWARD_CHECKS = [n for n, c in ALL_CHECKS.items() if is_collective(c)]


@dataclass
class Progress:
    """Where this rank is: the phase a failure is charged to (said to
    :mod:`smpcheck.run.whereabouts` as it changes, for the launcher and planted faults), and the
    strategy's own phases, as it names them, with those done."""

    names: tuple[str, ...]  # the strategy's phases, in the order it yields them
    done: list[str] = field(default_factory=list)
    _phase: str = START

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        self._phase = name
        whereabouts.enter(name)

    def strategy_phase(self) -> None:
        """The strategy is running the first of its phases not yet done, or finishing after
        its last."""
        self.phase = self.names[min(len(self.done), len(self.names) - 1)]

    def finished(self, name: str) -> None:
        """The strategy yielded ``name``: the phase it declared next, or a bug in it."""
        expected = self.names[len(self.done)] if len(self.done) < len(self.names) else None
        if name != expected:
            raise RuntimeError(f"the strategy yielded phase {name!r} where it declared "
                               f"{expected!r} (its phase_names: {self.names})")
        self.done.append(name)


@dataclass(frozen=True)
class Outputs:
    """Where rank 0 writes: ``report_dir/stem.{html,json,junit.xml,log}``."""

    report_dir: str
    stem: str

    @property
    def log(self) -> Path:
        return Path(self.report_dir) / f"{self.stem}.log"

    def write(self, report: Report, log: str = "") -> int:
        """The reports (and ``log``, the tracebacks, beside them), the summary on stdout and,
        when something failed, one sentence on stderr: the last line of a failed run,
        wherever it was launched from. Returns the run's exit code: 0, 1 when something
        failed, ``EXIT_NO_REPORT`` when all passed but the report could not be written."""
        print(report.summary(), flush=True)
        try:
            if log:
                self.log.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(self.log, log)
            paths = write_reports(report, self.report_dir, self.stem)
        except OSError as exc:
            said = verdict(report) if not report.ok else "every check passed"
            print(f"smpcheck: {said}; the report could not be written to {self.report_dir}: "
                  f"{exc}", file=sys.stderr, flush=True)
            return EXIT_FAILED if not report.ok else EXIT_NO_REPORT
        note = f", tracebacks in {self.log}" if log else ""
        print(f"[smpcheck] report: {paths['html']} (JSON {paths['json'].name}, JUnit "
              f"{paths['junit'].name}{note})", flush=True)
        if not report.ok:
            print(f"smpcheck: {verdict(report)}; report {paths['html']}{note}", file=sys.stderr,
                  flush=True)
            return EXIT_FAILED
        return 0


def verdict(report: Report) -> str:
    """What failed, in one sentence: the failed phase if a rank failed, else the first failed
    check, with the first tensors it names."""
    bad = [r for r in report.results if r.status in (Status.FAIL, Status.ERROR)]
    first = next((r for r in bad if r.name == UNCHANGED),  # the cause of every other
                 next((r for r in bad if r.traceback), bad[0]))
    text = first.message if first.traceback else f"{first.name} failed: {first.message}"
    named = "; ".join(f.sentence() for f in first.errors[:3])
    if len(first.errors) > 3:
        named += f"; and {len(first.errors) - 3} more"
    others = len(bad) - 1
    return (text + (f": {named}" if named else "")
            + (f" ({others} more check{'s' if others > 1 else ''} failed)" if others else ""))


def say(message: str) -> None:
    """A progress line, from rank 0 only."""
    if dist.get_rank() == 0:
        print(f"[smpcheck] {message}", flush=True)


def skipped_results(skip: tuple[str, ...]) -> list[CheckResult]:
    """One ``skip`` line per check left out with ``--skip``: nothing is left out silently."""
    return [CheckResult(name, Status.SKIP, f"not run: --skip {name}") for name in skip]


def run_job(opts: RunOptions, report_dir: str, stem: str) -> int:
    """Load, [transform], wrap and check on this rank; 0 when every check passed, else 1
    (a rank that fails exits 1 after rank 0 wrote the report)."""
    rank = dist.get_rank()
    strategy = STRATEGIES[opts.strategy]()
    reason = strategy.unavailable()
    if reason:
        say(f"SKIP strategy {opts.strategy}: {reason}")
        return 0
    outputs = Outputs(report_dir, stem)
    progress = Progress(strategy.phase_names(opts))
    opts = _armed(opts, rank, report_dir)
    identities = file_identities(opts.source.path)

    def failure_report(failures: list[RankFailure]) -> None:
        facts = run_facts(opts, dist.get_world_size())
        outputs.write(Report(failure_results(failures), facts, {}, str(outputs.log)),
                      log=failure_log(failures))

    protocol = FailureProtocol(FailureBoard.of_default_group(), rank, failure_report)
    with protocol.watching():
        try:
            report = _run_phases_and_checks(opts, strategy, progress)
            progress.phase = REPORT
            report.results[:0] = _unchanged(opts.source.path, identities)
        except Exception as exc:  # noqa: BLE001 - any failure ends the run with a report
            tensors = tensor_problems(str(exc)) if isinstance(exc, ParamInitError) else []
            protocol.fail(RankFailure.from_exception(rank, whereabouts.current(), exc, tensors))
    code = 0 if report.ok else EXIT_FAILED
    if rank == 0:
        _remove_stale_log(outputs.log)  # a log beside a report belongs to a failed run

        def write() -> None:
            nonlocal code
            code = outputs.write(report)

        protocol.finish(write)
    return code


def _remove_stale_log(log: Path) -> None:
    try:
        log.unlink(missing_ok=True)
    except OSError:  # a read-only report directory: Outputs.write says so
        pass


def _armed(opts: RunOptions, rank: int, report_dir: str) -> RunOptions:
    """The options with the checkpoint this rank reads: its own copy under a planted
    ``vanish`` (:mod:`smpcheck.run.faults`), else the same."""
    path = faults.arm(rank, opts.source.path, report_dir,
                      scratch=os.environ.get(whereabouts.RUN_STATE))
    if path == Path(opts.source.path):
        return opts
    return replace(opts, source=replace(opts.source, path=path))


def _unchanged(path: Path, identities: dict) -> list[CheckResult]:
    """A FAIL line when the checkpoint changed on any rank since it started (one gather)."""
    changes = [None] * dist.get_world_size()
    dist.all_gather_object(changes, changed_files(identities, path))
    findings: dict[tuple[str, str], Finding] = {}
    for rank, mine in enumerate(changes):
        for name, what in mine:
            findings.setdefault((name, what), Finding(name, [], what)).ranks.append(rank)
    if not findings:
        return []
    ranks = sorted({r for f in findings.values() for r in f.ranks})
    return [CheckResult(
        UNCHANGED, Status.FAIL,
        f"the checkpoint changed while the run read it, on rank{'s' if len(ranks) > 1 else ''} "
        f"{', '.join(map(str, ranks))}, so the checks compared with files that moved under "
        "them; rerun once it is stable",
        list(findings.values()))]


def _run_phases_and_checks(opts: RunOptions, strategy, progress: Progress) -> Report:
    rank, world = dist.get_rank(), dist.get_world_size()
    say(f"{opts.source.name}: strategy {opts.strategy}, {world} ranks, tp {opts.tp}, "
        f"device {opts.device}")
    cuda = opts.device.startswith("cuda")
    progress.phase = START
    warm_up(cuda)
    size = Checkpoint(opts.source.path).sizes(opts.dtype)
    reference = None
    with MemoryMonitor(rank=rank, cuda=cuda) as monitor:
        steps = strategy.phases(opts)
        while True:
            progress.strategy_phase()
            start = time.perf_counter()
            with monitor.phase("pending") as phase:
                name = next(steps, None)
                phase.name = name or "done"
            if name is None:
                monitor.record.phases.pop()
                break
            progress.finished(name)
            dist.barrier()
            say(f"{name:9} done in {time.perf_counter() - start:6.2f} s, rank 0 peak "
                f"{phase.peak_anon / MIB:.0f} MiB anonymous")
            if name == LOAD and rank == 0:
                reference = _reference(strategy, opts, size)
        progress.phase = CHECK
        model = strategy.model
        dense = _dense_model(opts, strategy, size.total)
        arguments = dict(checkpoint=opts.source.path, dense_model=dense,
                         adapter=opts.adapter_dir, config_overrides=opts.config_overrides,
                         reference_outputs=reference,
                         optimizer=getattr(strategy, "optimizer", None))
        reports = []
        for phase_name, phase_checks in ((CHECK, CHECKS), (FORWARD, FORWARD_CHECKS)):
            checks = [c for c in phase_checks if c not in opts.skip]
            if not checks:
                continue
            progress.phase = phase_name
            with monitor.phase(phase_name):
                start = time.perf_counter()
                reports.append(verify(model, checks=checks, **arguments))
                say(f"{phase_name:9} done in {time.perf_counter() - start:6.2f} s")
    bound = memory_bound(rank=rank, baseline=monitor.record.baseline_anon, size=size,
                         strategy=strategy.memory_strategy, world_size=world, tp_size=opts.tp,
                         sharded_over=strategy.sharded_over(world, opts.tp),
                         slack=(CUDA_SLACK if cuda else CPU_SLACK) + strategy.library_slack)
    memory = verify(model, checks=["memory"], memory=(monitor.record, bound))
    judged = [r for report in (*reports, memory) for r in report.results
              if r.name not in opts.skip]  # memory's record stays in the report, unjudged
    checked = reports[0] if reports else memory
    order = {name: i for i, name in enumerate(ALL_CHECKS)}
    results = sorted(judged + skipped_results(opts.skip), key=lambda r: order[r.name])
    return Report(results,
                  {**checked.environment, **run_facts(opts, world), "model_bytes": size.total,
                   **getattr(strategy, "environment", {})},
                  memory.memory, checked.expected)


def run_facts(opts: RunOptions, world_size: int) -> dict:
    """What the report says about the run, whether it finished or not (also written by the
    launching process, which has no process group, when no rank could)."""
    import transformers

    return {"strategy": opts.strategy, "tp_size": opts.tp, "model": opts.source.name,
            "model_path": str(opts.source.path), "device": opts.device,
            "world_size": world_size, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "launcher": _launcher()}


def _reference(strategy, opts: RunOptions, size) -> list[float] | None:
    """Rank 0's model as loaded, before any wrapping: the forward check's reference outputs,
    where that copy is whole and small enough for a cheap forward on the host."""
    if ("forward" in opts.skip or not strategy.whole_model_on_rank0 or opts.tp > 1
            or size.total > DENSE_NUMERICS_LIMIT):
        return None
    start = time.perf_counter()
    outputs = reference_outputs(strategy.model)
    say(f"reference outputs of rank 0's loaded model taken in {time.perf_counter() - start:.2f} s")
    return outputs


def _dense_model(opts: RunOptions, strategy, model_bytes: int):
    """A dense copy for tp_numerics: only with TP, only for models below the limit, and only
    where it can hold what the sharded model holds (no fresh head or adapter: those were
    drawn once, on the loading rank)."""
    if opts.tp <= 1 and not strategy.tp_over_world:
        return None
    if {"tp_numerics", "forward"} <= set(opts.skip):  # its users; tp_shards reads the files
        return None
    if model_bytes > DENSE_NUMERICS_LIMIT:
        say("tp_numerics skipped: a dense copy on every rank would exceed 1 GiB")
        return None
    if opts.fine_tuning:
        say("tp_numerics skipped: a dense copy cannot hold the same freshly drawn head or "
            "adapters")
        return None
    from reference_impl import load_on_rank0

    device = torch.device("cuda", torch.cuda.current_device()) if opts.device.startswith(
        "cuda") else torch.device("cpu")
    return load_on_rank0(opts.source.path, rank=0, **load_kwargs(opts)).to(device)


def _launcher() -> str:
    if os.environ.get("SLURM_PROCID") is not None and not os.environ.get("TORCHELASTIC_RUN_ID"):
        return "srun"
    if os.environ.get("SMPCHECK_SELF_LAUNCHED"):
        return "self-launched (torch elastic)"
    return "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "external"
