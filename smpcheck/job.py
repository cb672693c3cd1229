"""What each rank does for ``smpcheck run``: the strategy's phases under the memory monitor,
then every check, then (rank 0) the reports. Returns the exit code every rank agrees on."""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from smpcheck.checkpoint import Checkpoint
from smpcheck.memory import MemoryMonitor, memory_bound
from smpcheck.report.model import Report
from smpcheck.report.writers import write_reports
from smpcheck.strategies import STRATEGIES, RunOptions
from smpcheck.verify import verify

MIB = 2**20
# Growth any run shows whatever the model: lazily imported modules on the host; on CUDA also
# kernel images loaded on first use (measured on an H200: +70 MiB loading a 0.4 MiB model).
CPU_SLACK = 64 * MIB
CUDA_SLACK = 256 * MIB
DENSE_NUMERICS_LIMIT = 1 << 30  # a dense copy per rank for tp_numerics only below 1 GiB


def say(message: str) -> None:
    """A progress line, from rank 0 only."""
    if dist.get_rank() == 0:
        print(f"[smpcheck] {message}", flush=True)


def _warm_up(cuda: bool) -> None:
    """Initialise what every run pays for before the baseline is taken: the CUDA context and
    cuBLAS (about 0.5 GiB of host memory on an H200 node) and the communicator's buffers.
    The bound is about the model; this is not."""
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    probe = torch.ones(64, 64, device=device)
    probe = probe @ probe
    dist.all_reduce(probe)
    dist.all_gather_object([None] * dist.get_world_size(), 0)
    dist.barrier()


def _hang_if_asked(rank: int) -> None:
    """Self-test knob for the timeout path: SMPCHECK_DEBUG_HANG_RANK=N makes rank N hang."""
    if os.environ.get("SMPCHECK_DEBUG_HANG_RANK") == str(rank):
        while True:
            time.sleep(1)


def run_job(opts: RunOptions, report_dir: str, stem: str) -> int:
    """Load, [transform], wrap and check on this rank; 0 when every check passed, else 1."""
    rank, world = dist.get_rank(), dist.get_world_size()
    strategy = STRATEGIES[opts.strategy]()
    reason = strategy.unavailable()
    if reason:
        say(f"SKIP strategy {opts.strategy}: {reason}")
        return 0
    say(f"{opts.source.name}: strategy {opts.strategy}, {world} ranks, tp {opts.tp}, "
        f"device {opts.device}")
    cuda = opts.device.startswith("cuda")
    _warm_up(cuda)
    with MemoryMonitor(rank=rank, cuda=cuda) as monitor:
        steps = strategy.phases(opts)
        while True:
            start = time.perf_counter()
            with monitor.phase("pending") as phase:
                name = next(steps, None)
                phase.name = name or "done"
            if name is None:
                monitor.record.phases.pop()
                break
            if name == "wrap":
                _hang_if_asked(rank)
            dist.barrier()
            say(f"{name:9} done in {time.perf_counter() - start:6.2f} s, rank 0 peak "
                f"{phase.peak_anon / MIB:.0f} MiB anonymous")
        model = strategy.model
        size = Checkpoint(opts.source.path).sizes(opts.dtype)
        dense = _dense_model(opts, size.total)
        with monitor.phase("check"):
            start = time.perf_counter()
            report = verify(model, checkpoint=opts.source.path, dense_model=dense,
                            checks=["preflight", "initialised", "rank_parity",
                                    "checkpoint_parity", "tp_shards", "tp_numerics"])
            say(f"check     done in {time.perf_counter() - start:6.2f} s")
    bound = memory_bound(rank=rank, baseline=monitor.record.baseline_anon, size=size,
                         strategy=strategy.memory_strategy, world_size=world, tp_size=opts.tp,
                         slack=CUDA_SLACK if cuda else CPU_SLACK)
    extra = {"strategy": opts.strategy, "tp_size": opts.tp, "model": opts.source.name,
             "model_path": str(opts.source.path), "device": opts.device,
             "model_bytes": size.total, "created": datetime.datetime.now().isoformat(
                 timespec="seconds"), "launcher": _launcher()}
    memory = verify(model, checks=["memory"], memory=(monitor.record, bound))
    report = Report(report.results + memory.results, {**report.environment, **extra},
                    memory.memory)
    if rank == 0:
        print(report.summary(), flush=True)
        paths = write_reports(report, report_dir, stem)
        print(f"[smpcheck] report: {paths['html']} (JSON {paths['json'].name}, JUnit "
              f"{paths['junit'].name})", flush=True)
    return 0 if report.ok else 1


def _dense_model(opts: RunOptions, model_bytes: int):
    """A dense copy for tp_numerics: only with TP, and only for models below the limit."""
    if opts.tp <= 1 and opts.strategy != "tp_plan":
        return None
    from reference_impl import load_on_rank0

    if model_bytes > DENSE_NUMERICS_LIMIT:
        say("tp_numerics skipped: a dense copy on every rank would exceed 1 GiB")
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if opts.device.startswith(
        "cuda") else torch.device("cpu")
    kwargs = {"dtype": opts.dtype} if opts.dtype else {}
    return load_on_rank0(opts.source.path, rank=0, **kwargs).to(device)


def _launcher() -> str:
    if os.environ.get("SLURM_PROCID") is not None and not os.environ.get("TORCHELASTIC_RUN_ID"):
        return "srun"
    if os.environ.get("SMPCHECK_SELF_LAUNCHED"):
        return "self-launched (torch elastic)"
    return "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "external"

