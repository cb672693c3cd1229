"""``verify`` and ``preflight``: the public entry points, collective over all ranks."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smpcheck.checks import ALL_CHECKS, CheckContext
from smpcheck.checks.base import run_checks
from smpcheck.checks.checkpoint_parity import expected_data
from smpcheck.checks.memory import memory_data
from smpcheck.memory import Bound, MemoryRecord
from smpcheck.report.model import Report


class PreflightError(RuntimeError):
    """Ranks disagree on the model's structure; the message names the differences."""


def environment(ctx: CheckContext, hosts: list[str]) -> dict[str, Any]:
    """Versions, world and hosts: what a bug report needs."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "world_size": ctx.world_size,
        "backend": str(dist.get_backend(ctx.process_group)) if dist.is_initialized() else "",
        "hosts": sorted(set(hosts)),
        "rank_hosts": hosts,
        "model": type(ctx.inner).__name__,
        "checkpoint": str(ctx.checkpoint or ""),
        "devices": sorted({p.device.type for p in ctx.model.parameters()}),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
    }


def verify(
    model: nn.Module,
    *,
    checkpoint: str | os.PathLike | None = None,
    dense_model: nn.Module | None = None,
    process_group: Any = None,
    checks: Iterable[str] | None = None,
    adapter: str | os.PathLike | None = None,
    config_overrides: dict[str, Any] | None = None,
    reference_outputs: list[float] | None = None,
    memory: tuple[MemoryRecord, Bound] | None = None,
    environment_extra: dict[str, Any] | None = None,
    adapter_complete: bool = False,
    optimizer: Any = None,
) -> Report:
    """Check a wrapped model on every rank and return the same :class:`Report` everywhere.

    Call it collectively (every rank, same arguments) after wrapping with FSDP1, FSDP2, TP or
    nothing at all. Checks that lack what they need (no checkpoint, no dense model, no TP)
    report ``skip`` with the reason; none passes silently.

    Args:
        model: the model as the training loop will use it.
        checkpoint: safetensors directory (or file) the weights should equal.
        dense_model: an unsharded reference model, for TP shards and numerics.
        process_group: the group to check across (default: the world).
        checks: names to run (default: all): preflight, initialised, rank_parity,
            checkpoint_parity, tp_shards, tp_numerics, memory.
        adapter: the PEFT adapter directory the model's adapters were loaded from; they are
            then compared with its file instead of judged as a fresh init.
        config_overrides: config fields changed on purpose at load
            (``from_pretrained(path, **overrides)``): config_parity applies them to
            ``config.json`` before comparing.
        reference_outputs: on any rank, a sample of a trusted unwrapped copy's outputs for
            the forward check's batch (``smpcheck.checks.forward.reference_outputs(model)``
            on rank 0's model before wrapping); the wrapped model's must agree with it.
        memory: this rank's monitor record and bound, for the memory check and the report.
        environment_extra: more facts for the report's environment (strategy, TP degree).
        adapter_complete: the adapter directory was just saved from this model, so every
            adapter tensor must be in its file (a missing one is an error, not a fresh init):
            see :func:`smpcheck.verify_saved`.
        optimizer: the optimizer training will step (DeepSpeed's ZeRO optimizers): its fp32
            master weights must equal the parameters they master.

    Returns:
        The report; ``report.ok`` is False when any check failed or errored.

    Raises:
        ValueError: an unknown check name, or an empty list of checks.

    Example:
        >>> report = smpcheck.verify(model, checkpoint="/ckpt/llama")  # doctest: +SKIP
        >>> assert report.ok, report.summary()
    """
    names = list(ALL_CHECKS if checks is None else checks)
    if not names:
        raise ValueError("checks=[] runs nothing; pass None for all checks, or name some of "
                         f"{list(ALL_CHECKS)}")
    unknown = [n for n in names if n not in ALL_CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(ALL_CHECKS)}")
    ctx = CheckContext(
        model,
        Path(checkpoint) if checkpoint else None,
        dense_model,
        process_group,
        {**({"memory": memory} if memory else {}),
         **({"optimizer": optimizer} if optimizer is not None else {}),
         **({"reference_outputs": reference_outputs} if reference_outputs else {})},
        adapter=Path(adapter) if adapter else None,
        config_overrides=dict(config_overrides or {}),
        checks=tuple(names),
        adapter_complete=adapter_complete,
    )
    run = run_checks(ctx, [ALL_CHECKS[n]() for n in names])
    return Report(
        run.results,
        {**environment(ctx, run.hosts), **(environment_extra or {})},
        memory_data(run.gathered["memory"]) if "memory" in run.gathered else {},
        expected_data(run.gathered.get("checkpoint_parity", []), run.hosts),
    )


def preflight(model: nn.Module, process_group: Any = None, *, strict: bool = True) -> Report:
    """Compare the model's structure across ranks before any FSDP or TP collective.

    Raises:
        PreflightError: (with ``strict``) the ranks differ; the message names each difference
            as a sentence, instead of a backend abort later.
    """
    report = verify(model, process_group=process_group, checks=["preflight"])
    if strict and not report.ok:
        raise PreflightError("ranks disagree on the model's structure:\n" + report.summary())
    return report
