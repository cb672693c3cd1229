"""Per-rank host (and GPU) memory, sampled in the background, with phase marks and a bound.

What is measured, and why each figure:

* ``RssAnon`` (``/proc/self/status``): anonymous resident memory, what the OOM killer sees.
  Sampled every ``interval`` seconds by a daemon thread (reading one small proc file).
* ``RssFile``: file-backed resident pages, i.e. memory-mapped safetensors. transformers 5 maps
  checkpoints, and the page cache is shared between ranks: it is reported, not bounded.
* ``VmHWM``: the kernel's own peak resident set (anon + file + shmem). It is reset at the
  start of every phase (``/proc/self/clear_refs`` with ``5``), so each phase has an exact
  peak that no sampling interval can miss; when it exceeds every sample, the phase had a
  spike shorter than the interval, and the report says so.
* PSS/USS (``psutil.memory_full_info``, which reads ``smaps``: costly, so once per phase end)
  and ``ru_maxrss`` (the process's lifetime peak), node ``MemAvailable``, and
  ``torch.cuda.max_memory_allocated`` per phase when a CUDA device is in use.

The bound for a rank comes from the model: parameter count x bytes per element, times the
fraction of the model this rank must hold under the strategy, times a stated allowance for
transient copies, plus this rank's measured baseline (before loading).

Beside this module: :mod:`~smpcheck.memory.phases` (the phases a run marks, and which of them
the bound covers), :mod:`~smpcheck.memory.plan` (``smpcheck plan``: the same bound model,
predicted from headers before anything is loaded) and its fitted constants
(:mod:`~smpcheck.memory.plan_fit`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

_KB = 1024


def read_status() -> dict[str, int]:
    """RssAnon, RssFile, RssShmem and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * _KB
    return out


def reset_kernel_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def node_available() -> int:
    return psutil.virtual_memory().available


@dataclass
class Phase:
    """One marked phase: when, and the peaks seen in it (bytes)."""

    name: str
    start: float
    end: float = 0.0
    peak_anon: int = 0  # sampled
    peak_file: int = 0  # sampled
    peak_rss_sampled: int = 0
    start_rss: int = 0  # VmRSS when the phase began (what VmHWM was reset to)
    kernel_peak_rss: int = 0  # VmHWM since the phase began (exact)
    uss: int = 0
    pss: int = 0
    cuda_peak: int = 0
    spike_missed_by_sampling: bool = False


@dataclass
class MemoryRecord:
    """What one rank's monitor saw: samples (t, anon, file), phases, baseline and peaks."""

    rank: int
    host: str
    interval: float
    baseline_anon: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    ru_maxrss: int = 0
    node_available_min: int = 0
    kernel_peak_resets: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryRecord:
        phases = [Phase(**p) for p in data.get("phases", [])]
        samples = [tuple(s) for s in data.get("samples", [])]
        return cls(**{**data, "phases": phases, "samples": samples})

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    @property
    def peak_anon(self) -> int:
        return max((p.peak_anon for p in self.phases), default=self.baseline_anon)


# Libraries that accelerate and transformers import lazily whenever they are installed (deepspeed
# from accelerator.prepare: +70 MiB anonymous per rank on CPU, measured), so a model's phase is
# never charged for them.
LAZY_LIBRARIES = ("deepspeed",)


def warm_up(cuda: bool) -> None:
    """Initialise what every run pays for before a baseline is taken: the CUDA context and
    cuBLAS (about 0.5 GiB of host memory on an H200 node), the libraries imported lazily
    whatever the model, and the communicator's buffers.
    A bound is about the model; this is not. Collective when a process group exists."""
    import torch
    import torch.distributed as dist

    for name in LAZY_LIBRARIES:  # imported anyway, mid-phase, whenever installed
        if importlib.util.find_spec(name) is not None:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a broken install is the library's to report
                pass
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    probe = torch.ones(64, 64, device=device)
    probe = probe @ probe
    if dist.is_initialized():
        dist.all_reduce(probe)
        dist.all_gather_object([None] * dist.get_world_size(), 0)
        dist.barrier()


class MemoryMonitor:
    """Sample this rank's memory in a background thread and mark phases.

    Example:
        >>> with MemoryMonitor(rank=0) as mon:  # doctest: +SKIP
        ...     with mon.phase("load"):
        ...         model = load_on_rank0(path)
        >>> mon.record.phase("load").peak_anon
    """

    def __init__(self, rank: int = 0, interval: float = 0.005, cuda: bool = False) -> None:
        self.interval = interval
        self.cuda = cuda
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._current: Phase | None = None
        self._thread = threading.Thread(
            target=self._sample_forever, name="smpcheck-memory", daemon=True
        )
        self._t0 = time.monotonic()
        self.record = MemoryRecord(
            rank=rank,
            host=os.uname().nodename,
            interval=interval,
            baseline_anon=read_status()["RssAnon"],
            node_available_min=node_available(),
        )

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.record.ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KB

    def _sample(self) -> None:
        status = read_status()
        now = time.monotonic() - self._t0
        with self._lock:
            self.record.samples.append((round(now, 4), status["RssAnon"], status["RssFile"]))
            phase = self._current
            if phase is not None:
                phase.peak_anon = max(phase.peak_anon, status["RssAnon"])
                phase.peak_file = max(phase.peak_file, status["RssFile"])
                phase.peak_rss_sampled = max(phase.peak_rss_sampled, status["VmRSS"])

    def _sample_forever(self) -> None:
        ticks = 0
        while not self._stop.is_set():
            self._sample()
            ticks += 1
            if ticks % 200 == 0:
                self.record.node_available_min = min(
                    self.record.node_available_min, node_available()
                )
            self._stop.wait(self.interval)

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Mark a phase; its peaks are recorded when it ends."""
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.record.kernel_peak_resets &= reset_kernel_peak()
        phase = Phase(name, start=round(time.monotonic() - self._t0, 4),
                      start_rss=read_status()["VmRSS"])
        with self._lock:
            self._current = phase
            self.record.phases.append(phase)
        self._sample()
        try:
            yield phase
        finally:
            self._sample()
            status = read_status()
            info = psutil.Process().memory_full_info()
            with self._lock:
                self._current = None
                phase.end = round(time.monotonic() - self._t0, 4)
                phase.kernel_peak_rss = status["VmHWM"]
                phase.uss, phase.pss = info.uss, getattr(info, "pss", 0)
                phase.spike_missed_by_sampling = (
                    phase.kernel_peak_rss > phase.peak_rss_sampled * 1.05 + 8 * 2**20
                )
            if self.cuda:
                import torch

                phase.cuda_peak = torch.cuda.max_memory_allocated()


@dataclass(frozen=True)
class ModelSize:
    """Bytes of the model's parameters, its largest tensor, and its largest FSDP unit (one
    decoder layer, or everything outside the layers: embeddings, head and final norm)."""

    total: int
    largest_tensor: int
    largest_unit: int


# Fraction of the model a rank must hold at its peak, by strategy: (rank 0, other ranks).
# ``shard`` is 1 / the ranks the weights are split over; ``tensor`` and ``unit`` the largest
# tensor and FSDP unit as fractions of the model.
def _holds(strategy: str, shard: float, tensor: float, unit: float) -> tuple[float, float]:
    table = {
        # rank 0 holds the model; every rank materialises a whole unit (receiving rank 0's
        # values into it: sync_module_states), flattens it into a new buffer, and the
        # allocator keeps the previous unit's freed pages: three units (measured, 1B Llama)
        "smp": (1.0 + shard + 3 * unit, shard + 3 * unit),
        "fsdp2": (1.0 + shard, shard + tensor),  # full state dict on rank 0; one in flight
        "naive": (1.0 + shard, 1.0 + shard),  # every rank loads everything
        "streaming": (shard + 2 * tensor, shard + tensor),  # one read + one in flight
        "tp_plan": (shard + unit, shard + unit),
        # accelerate's plugin with cpu_ram_efficient_loading: transformers 5.24 still loads on
        # every rank (measured per rank by the strategy's loading probe). FSDP2: each rank
        # keeps its loaded copy through prepare and gains its shard; the others also receive
        # rank 0's full tensors one at a time and copy out their shard. Measured (2 ranks,
        # 610 MiB fp32 Llama from bf16 files): rank 0 1.52-1.55x, rank 1 1.77-1.90x.
        "accelerate-fsdp": (1.0 + shard + tensor, 1.0 + shard + 2 * tensor),
        # FSDP1: the loaded copy, plus the flat shard built one unit at a time (measured as
        # above: 1.33-1.40x on both ranks; naive loading 1.34x)
        "accelerate-fsdp1": (1.0 + shard + unit, 1.0 + shard + unit),
        # DeepSpeed ZeRO-3 through transformers: rank 0 reads each tensor (the files are
        # mapped) while every rank gathers one module's partitions to receive it; after
        # initialize, each rank holds its partitions, a flat copy of them and the optimizer's
        # fp32 partitions (three shards), plus gathering buffers of a unit
        "deepspeed-zero3": (3 * shard + 2 * unit + tensor, 3 * shard + 2 * unit),
        # ZeRO-1/2: every rank loads the model, then the optimizer flattens each parameter
        # group into one buffer while the parameters are alive (a second copy) and keeps its
        # fp32 partition of it (measured, 4 ranks, 1.0 GiB fp32 Llama: 2.06x at wrap, which
        # the "naive" row it followed before bounded at 1.88x: a false failure)
        "deepspeed-zero2": (2.0 + shard, 2.0 + shard),
    }
    if strategy not in table:
        raise ValueError(f"no memory bound for strategy {strategy!r}; known: {sorted(table)}")
    return table[strategy]


def rank_share(strategy: str, size: ModelSize, rank: int, sharded_over: int) -> float:
    """The fraction of the model ``rank`` holds at its peak under ``strategy`` (a row of
    :func:`_holds`), the weights split over ``sharded_over`` ranks. One model for the memory
    bound of a run and for ``smpcheck plan``'s prediction before one."""
    total = size.total or 1
    return _holds(strategy, 1.0 / sharded_over, size.largest_tensor / total,
                  size.largest_unit / total)[0 if rank == 0 else 1]


@dataclass
class Bound:
    """The most anonymous memory a rank may use, and how that number was derived."""

    rank: int
    limit: int
    baseline: int
    model_bytes: int
    share: float
    allowance: float
    slack: int
    derivation: str


def memory_bound(*, rank: int, baseline: int, size: ModelSize, strategy: str,
                 world_size: int, tp_size: int = 1, sharded_over: int | None = None,
                 allowance: float = 1.5, slack: int = 64 * 2**20) -> Bound:
    """Bound for one rank: baseline + slack + allowance x (share of the model it must hold).

    Args:
        rank: the rank the bound is for.
        baseline: its anonymous RSS before loading (torch, the device and the communicator
            initialised).
        size: the model's parameter bytes, largest tensor and largest FSDP unit.
        strategy: a row of :func:`_holds` (smp, fsdp2, naive, streaming, tp_plan, the
            accelerate and DeepSpeed strategies).
        world_size, tp_size: the run's world and TP degree (stated in the derivation).
        sharded_over: how many ranks split the weights between them (default the world:
            TP x data-parallel sharding; the TP degree where TP alone shards them).
        allowance: factor for transient copies (dtype casts, send buffers).
        slack: fixed bytes for what grows with any run (allocator arenas, lazily imported
            modules, communication buffers), whatever the model's size.
    """
    share = rank_share(strategy, size, rank, sharded_over or world_size)
    limit = int(baseline + slack + allowance * share * size.total)
    mib = 2**20
    derivation = (f"baseline {baseline / mib:.0f} MiB + slack {slack / mib:.0f} MiB + "
                  f"{allowance:g} x {share:.3f} x model {size.total / mib:.1f} MiB "
                  f"({strategy}: rank {rank} holds {share:.3f} of the model at its peak; "
                  f"world {world_size}, tp {tp_size}, largest unit "
                  f"{size.largest_unit / mib:.1f} MiB, largest tensor "
                  f"{size.largest_tensor / mib:.1f} MiB)")
    return Bound(rank, limit, baseline, size.total, share, allowance, slack, derivation)
