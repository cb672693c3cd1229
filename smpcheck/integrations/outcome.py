"""What the integrations share: which wrapper a model is under, how much of it this rank
holds, and how a report ends a run (reports written, the same sentence raised or warned on
every rank)."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from smpcheck.report.model import Report, Status
from smpcheck.report.writers import write_reports
from smpcheck.shards.pieces import flat_full_shapes, is_zero3, iter_pieces
from smpcheck.shards.tensors import clean_name

ON_FAILURE = ("raise", "warn")


class SmpcheckFailed(RuntimeError):
    """A check failed: the message is one sentence, the same on every rank."""


class SmpcheckWarning(UserWarning):
    """A check failed and ``on_failure="warn"`` let the run go on."""


def check_on_failure(on_failure: str) -> str:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    return on_failure


def wrapping(model: nn.Module) -> dict[str, Any]:
    """How this rank holds the model: the wrapper's name and the share of the parameter
    elements it keeps (local, no communication). A share of 1.0 with world size 2 means
    nothing was sharded, whatever the configuration asked for."""
    from torch.distributed.fsdp import FSDPModule

    flat_shapes = flat_full_shapes(model)
    global_numel = {clean_name(n): p.numel() for n, p in model.named_parameters()}
    full = sum(math.prod(shape) for shape, _ in flat_shapes.values())  # pieces elsewhere too
    local = 0
    dtensor = two_dims = False
    for piece in iter_pieces(model):
        if not piece.is_param:
            continue
        local += piece.data.numel()
        dtensor |= piece.kind == "dtensor"
        two_dims |= piece.kind == "dtensor" and piece.mesh.ndim > 1
        if piece.kind != "flat":
            full += global_numel.get(piece.name, piece.data.numel())
    fsdp2 = any(isinstance(m, FSDPModule) for m in model.modules())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if any(is_zero3(p) for p in model.parameters()):
        name = "deepspeed-zero3"
    elif flat_shapes:
        name = "fsdp1"
    elif fsdp2:
        name = "tp+fsdp2" if two_dims else "fsdp2"
    elif dtensor:
        name = "tp"
    elif type(model).__name__ == "DistributedDataParallel":
        name = "ddp"
    else:  # the Trainer hands its callbacks the module inside DDP
        name = "replicated" if world > 1 else "none"
    return {"wrapper": name, "held_share": round(local / full, 4) if full else 1.0}


def checkpoint_of(model: nn.Module) -> tuple[str | None, str]:
    """The checkpoint the model was loaded from, by its ``name_or_path`` (a local directory or
    a hub id in the local cache; FSDP1 and PEFT wrap the model, so the first module that has
    one), and where that answer came from, for the report."""
    from smpcheck.checkpoint.source import UsageError, resolve

    name = next((m.name_or_path for m in model.modules()
                 if isinstance(getattr(m, "name_or_path", None), str) and m.name_or_path), "")
    if not name:
        return None, "none: the model has no name_or_path"
    try:
        return str(resolve(name).path), "the model's name_or_path"
    except UsageError as exc:
        return None, f"none: {exc}"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def timed_verify(model: nn.Module, **kwargs: Any) -> tuple[Report, float]:
    """``smpcheck.verify`` and the seconds it took on this rank."""
    from smpcheck import verify

    start = time.perf_counter()
    report = verify(model, **kwargs)
    return report, time.perf_counter() - start


def failure_sentence(report: Report, where: str, html: Path) -> str:
    """One sentence: the first error finding (its tensor, ranks and fix), how many more, and
    where the full report is. Built from the report alone, so every rank says the same."""
    bad = [r for r in report.results if r.status in (Status.FAIL, Status.ERROR)]
    findings = [(r.name, f) for r in bad for f in r.errors]
    if findings:
        check, finding = findings[0]
        detail, more = f"[{check}] {finding.sentence()}", len(findings) - 1
    else:
        detail, more = f"[{bad[0].name}] {bad[0].message}", len(bad) - 1
    also = f" (and {more} more)" if more else ""
    return f"smpcheck: {where} is not right: {detail}{also}; full report: {html}"


def conclude(report: Report, *, report_dir: str | Path, stem: str, on_failure: str,
             where: str) -> Report:
    """Write the reports (rank 0), then raise or warn on every rank when a check failed.

    Raises:
        SmpcheckFailed: a check failed and ``on_failure`` is ``"raise"``.
    """
    html = Path(report_dir) / f"{stem}.html"
    if rank() == 0:
        write_reports(report, report_dir, stem)
    if report.ok:
        return report
    if dist.is_initialized():  # no rank leaves (and gets its peers killed) before the files exist
        dist.barrier()
    sentence = failure_sentence(report, where, html)
    if on_failure == "raise":
        raise SmpcheckFailed(sentence)
    warnings.warn(sentence, SmpcheckWarning, stacklevel=3)
    return report
