"""smpcheck after ``accelerator.prepare(model)`` under accelerate's FSDP plugin.

accelerate wraps the model in ``prepare`` (FSDP1: ``FullyShardedDataParallel`` with
``sync_module_states``; FSDP2: ``fully_shard`` per decoder layer, then, with
``cpu_ram_efficient_loading``, rank 0's full state dict broadcast into the shards and the
non-persistent buffers re-registered from each rank's own copy). That is the moment to check:
every rank holds its final shard and nothing has trained yet.

Example (every rank, after the process group exists; see ``examples/accelerate_fsdp.py``):
    >>> accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(  # doctest: +SKIP
    ...     fsdp_version=2, cpu_ram_efficient_loading=True))
    >>> with LoadingMonitor() as loading:
    ...     with loading.phase("load"):
    ...         model = AutoModelForCausalLM.from_pretrained(path)
    ...     loading.probe(model, path)
    ...     with loading.phase("wrap"):
    ...         model, optimizer = accelerator.prepare(model, AdamW(model.parameters()))
    >>> report = verify_prepared(model, accelerator, checkpoint=path, loading=loading)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smpcheck.checkpoint import Checkpoint
from smpcheck.integrations.loading import RankLoading, loading_verdict, probe_loading
from smpcheck.integrations.outcome import (
    check_on_failure,
    checkpoint_of,
    conclude,
    rank,
    timed_verify,
    wrapping,
)
from smpcheck.memory import (
    Bound,
    MemoryMonitor,
    MemoryRecord,
    Phase,
    memory_bound,
    warm_up,
)
from smpcheck.report.model import Report
from smpcheck.run.compat import fsdp_version_of

# Memory-bound rows (``smpcheck.memory._holds``) of accelerate's FSDP path, by FSDP version.
MEMORY_ROWS = {1: "accelerate-fsdp1", 2: "accelerate-fsdp"}


class LoadingMonitor:
    """This rank's memory from before ``from_pretrained`` to after ``accelerator.prepare``.

    Start it on every rank after the process group exists (``Accelerator()`` creates it).
    It first initialises the CUDA context and the communicator (a collective), so the baseline
    holds them but no weights: on a GPU node the context alone is about 0.5 GiB of host memory,
    which would otherwise land in ``wrap`` and fail a small model's bound. Mark ``load`` and
    ``wrap`` with :meth:`phase`; :meth:`probe` after loading records whether this rank read
    the checkpoint.

    Args:
        cuda: the model trains on CUDA (default: whether CUDA is available); also records the
            CUDA allocator's peak per phase.
        dtype: the dtype the model is loaded in, for the bound (default: as stored).
    """

    def __init__(self, *, cuda: bool | None = None, dtype: torch.dtype | None = None) -> None:
        cuda = torch.cuda.is_available() if cuda is None else cuda
        warm_up(cuda)
        self.monitor = MemoryMonitor(rank=rank(), cuda=cuda)
        self.dtype = dtype
        self.loading: RankLoading | None = None
        self._running = False

    def __enter__(self) -> LoadingMonitor:
        self.monitor.__enter__()
        self._running = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (again is harmless): the record must not change while gathered."""
        if self._running:
            self.monitor.__exit__(None, None, None)
            self._running = False

    def phase(self, name: str) -> AbstractContextManager[Phase]:
        return self.monitor.phase(name)

    def probe(self, model: nn.Module, checkpoint: str | os.PathLike) -> RankLoading:
        """Right after ``from_pretrained``: did this rank read the files (local, no collective)."""
        self.loading = probe_loading(model, checkpoint, rank())
        return self.loading

    @property
    def record(self) -> MemoryRecord:
        return self.monitor.record


def plugin_facts(accelerator: Any) -> dict[str, Any]:
    """The FSDP version and ``cpu_ram_efficient_loading`` accelerate actually applied
    (``{}`` when it applied no FSDP plugin, as on CPU without ``enable_fsdp_on_cpu``)."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None:
        return {}
    return {"fsdp_version": fsdp_version_of(plugin),
            "cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading)}


def loading_bound(loading: LoadingMonitor, checkpoint: str | os.PathLike, row: str) -> Bound:
    """This rank's bound for the loading it just did, under the memory row ``row``."""
    size = Checkpoint(checkpoint).sizes(loading.dtype)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return memory_bound(rank=rank(), baseline=loading.record.baseline_anon, size=size,
                        strategy=row, world_size=world)


def gather_loading(mine: RankLoading | None) -> dict[str, Any]:
    """Every rank's probe, gathered (one all_gather_object), as report lines; ``{}`` if no
    rank probed."""
    per_rank = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
    probed = [r for r in per_rank if r is not None]
    if not probed:
        return {}
    import transformers

    return {"loading": [r.sentence() for r in probed],
            "loading_verdict": f"transformers {transformers.__version__}: "
                               f"{loading_verdict(probed)}"}


def verify_prepared(model: nn.Module, accelerator: Any = None, *,
                    checkpoint: str | os.PathLike | None = None,
                    checks: Iterable[str] | None = None, loading: LoadingMonitor | None = None,
                    report_dir: str | os.PathLike = "reports", stem: str = "smpcheck-accelerate",
                    on_failure: str = "raise", adapter: str | os.PathLike | None = None,
                    config_overrides: dict[str, Any] | None = None) -> Report:
    """Verify the model ``accelerator.prepare`` returned, on every rank, and write reports.

    Args:
        model: what ``prepare`` returned.
        accelerator: the ``Accelerator``; its FSDP plugin picks the memory bound and goes in
            the report.
        checkpoint: safetensors directory the weights should equal (default: the model's
            ``name_or_path`` when it is a local directory or a cached hub id).
        checks: check names (default: all).
        loading: the :class:`LoadingMonitor` that watched ``from_pretrained`` and
            ``prepare``: its record is bounded and charted, its probe reported per rank.
        report_dir, stem: rank 0 writes ``stem.{html,json,junit.xml}`` there.
        on_failure: ``"raise"`` (:class:`SmpcheckFailed`, the same sentence on every rank)
            or ``"warn"``.
        adapter, config_overrides: as for :func:`smpcheck.verify` (a trained PEFT adapter's
            directory; config fields set on purpose at load).

    Returns:
        The report (its results are the same on every rank).
    """
    check_on_failure(on_failure)
    facts = plugin_facts(accelerator)
    row = MEMORY_ROWS.get(facts.get("fsdp_version", 0), "naive")
    source = "given"
    if checkpoint is None:
        checkpoint, source = checkpoint_of(model)
    memory = None
    extra: dict[str, Any] = {"integration": "accelerate", "strategy": row, **facts,
                             **wrapping(model), "checkpoint_source": source}
    if loading is not None:
        loading.stop()
        extra.update(gather_loading(loading.loading))
        if checkpoint:
            memory = (loading.record, loading_bound(loading, checkpoint, row))
    report, seconds = timed_verify(model, checkpoint=checkpoint, checks=checks, memory=memory,
                                   adapter=adapter, config_overrides=config_overrides,
                                   environment_extra=extra)
    report.environment["verify_s"] = round(seconds, 3)
    return conclude(report, report_dir=report_dir, stem=stem, on_failure=on_failure,
                    where="the model accelerator.prepare returned")
