"""Saves and resumes: what a checkpoint folder holds, and the files just written checked against
the live model.

The wrong-weights class that strikes at the first load strikes again at every save: an adapter
saved under FSDP2 as "adapter only" holding rank 0's slice alone, an adapter file written empty
under ZeRO-3, a partial DCP save. Users notice from the loss, hours after the resume. So
:func:`verify_saved` compares the files a save just wrote with the model that wrote them, tensor
by tensor (each rank reads only the pieces it holds), and a resumed run is compared with the
checkpoint it resumed from (:func:`resumed_from`).

A folder is one of (:func:`saved_layout`):

* ``full``: Hugging Face weights (``model.safetensors`` or its index), as ``save_pretrained``
  and the Trainer's full-state-dict save write them;
* ``dcp``: a torch.distributed.checkpoint directory, or a Trainer folder holding one
  (``pytorch_model_fsdp_0``: FSDP's sharded state dict);
* ``adapter``: a PEFT adapter-only save (``adapter_model.safetensors``): its adapters are
  compared with the file, every one of them required; the frozen base with the base checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from smpcheck.checkpoint.dcp import dcp_folder
from smpcheck.report.model import Report

FULL, DCP, ADAPTER = "full", "dcp", "adapter"
SAVE_CHECKS = ["checkpoint_parity", "coverage"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_FILE = "adapter_model.safetensors"
CHECKPOINT_PREFIX = "checkpoint"  # the Trainer's checkpoint-<step> folders


def saved_layout(folder: str | os.PathLike) -> str | None:
    """What kind of save ``folder`` holds (None: no weights smpcheck can read)."""
    folder = Path(folder)
    if any((folder / name).exists() for name in WEIGHT_FILES):
        return FULL
    if dcp_folder(folder) is not None:
        return DCP
    if (folder / ADAPTER_FILE).exists():
        return ADAPTER
    return None


def verify_saved(model: nn.Module, folder: str | os.PathLike, *,
                 base_checkpoint: str | os.PathLike | None = None, process_group: Any = None,
                 environment_extra: dict[str, Any] | None = None) -> Report:
    """Check that the save just written to ``folder`` equals the live ``model``.

    Call it collectively (every rank, same arguments) right after the save, before training
    goes on. Full and DCP saves are compared tensor by tensor, with every stored tensor's
    shape and coverage; an adapter-only save must hold every adapter tensor of the model (an
    empty or partial file is an error naming each missing tensor and the file), each equal
    to what the ranks hold.

    Args:
        model: the model that was saved, as the training loop holds it (wrapped or not).
        folder: the directory the save wrote.
        base_checkpoint: for an adapter-only save, the base model's checkpoint (default:
            the model's ``name_or_path``); without one only the adapters are compared.
        process_group: the group to check across (default: the world).
        environment_extra: more facts for the report (the step, the trigger).

    Returns:
        The report, the same on every rank; ``report.ok`` is False when the save differs.

    Raises:
        ValueError: ``folder`` holds no weights smpcheck can read (one sentence).

    Example:
        >>> trainer.save_model(out)  # doctest: +SKIP
        >>> assert smpcheck.verify_saved(model, out).ok
    """
    from smpcheck.integrations.outcome import checkpoint_of
    from smpcheck.verify import verify

    if dist.is_initialized():  # rank 0 may still be writing: read only once every rank is here
        dist.barrier(group=process_group)
    layout = saved_layout(folder)
    extra = {"saved": str(folder), "saved_layout": layout, **(environment_extra or {})}
    if layout is None:
        raise ValueError(f"{folder} holds no model weights smpcheck can read (no "
                         f"{' / '.join(WEIGHT_FILES)}, no DCP .metadata, no {ADAPTER_FILE}): "
                         "did the save write anything?")
    if layout != ADAPTER:
        return verify(model, checkpoint=folder, checks=SAVE_CHECKS,
                      process_group=process_group, environment_extra=extra)
    base = base_checkpoint if base_checkpoint is not None else checkpoint_of(model)[0]
    return verify(model, checkpoint=base, adapter=folder, adapter_complete=True,
                  checks=SAVE_CHECKS, process_group=process_group, environment_extra=extra)


def resumed_from(output_dir: str | os.PathLike, step: int,
                 given: str | os.PathLike | bool | None = None) -> Path | None:
    """The Trainer checkpoint a run at ``step`` resumed from: the path given to
    ``resume_from_checkpoint`` when it is one, else ``<output_dir>/checkpoint-<step>`` (where
    ``resume_from_checkpoint=True`` finds it, and whose step the resumed state carries)."""
    if isinstance(given, (str, os.PathLike)) and Path(given).is_dir():
        return Path(given)
    folder = Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"
    return folder if folder.is_dir() else None
