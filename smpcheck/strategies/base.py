"""A strategy is one way through load -> [transform] -> wrap, run on every rank.

Each strategy yields phases to the job (which times them and samples memory) and ends with
the model the training loop would use. The job never needs to know which strategy it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from smpcheck.checkpoint.source import ModelSource
from smpcheck.memory.phases import LOAD, WRAP
from smpcheck.run.compat import dtype_kwarg
from smpcheck.strategies.finetune import LoraSpec


@dataclass
class RunOptions:
    """What ``smpcheck run`` was asked for, as every rank sees it.

    ``model_class`` (a transformers class name, ``AutoModelFor...`` included) and
    ``config_overrides`` (``num_labels``...) choose the model built from the checkpoint;
    ``lora`` (a new adapter) or ``adapter_dir`` (a trained one) add PEFT adapters after loading.
    """

    source: ModelSource
    strategy: str
    tp: int = 1
    device: str = "cpu"
    dtype: torch.dtype | None = None
    model_class: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec | None = None
    adapter_dir: Path | None = None
    skip: tuple[str, ...] = ()  # checks not run (``--skip``), reported as skipped

    @property
    def fine_tuning(self) -> bool:
        """Anything beyond the checkpoint's own model: another head, overrides, adapters."""
        return bool(self.model_class or self.config_overrides or self.adapted)

    @property
    def adapted(self) -> bool:
        return self.lora is not None or self.adapter_dir is not None


class StrategyBase:
    """Defaults shared by every strategy: no model yet, available everywhere. The class
    attributes are the facts the CLI, the job and the memory bound ask a strategy about."""

    name = ""
    memory_strategy = ""  # the row of smpcheck.memory's bound table this strategy follows
    tp_over_world = False  # its own TP over every rank (transformers' tp_plan): tp = world
    fine_tuning = True  # builds another head, config overrides and adapters on request
    adapters = True  # can attach PEFT adapters after loading
    adapters_under_tp = False  # its TP shards the adapters too (ours does not)
    whole_model_on_rank0 = True  # rank 0 holds the whole loaded model after "load"
    library_slack = 0  # bytes a library the strategy imports costs whatever the model

    def __init__(self) -> None:
        self.model: nn.Module | None = None

    def unavailable(self) -> str | None:
        return None

    def phase_names(self, opts: RunOptions) -> tuple[str, ...]:
        """The phases ``phases(opts)`` yields, in order: the job marks each as it starts, so
        a failure or a planted fault is charged to the phase that was running."""
        return (LOAD, WRAP)

    @classmethod
    def tp_degree(cls, requested: int, world: int) -> int:
        """The TP degree a run with ``--tp requested`` on ``world`` ranks uses."""
        return world if cls.tp_over_world and requested == 1 else requested

    @classmethod
    def sharded_over(cls, world: int, tp: int) -> int:
        """How many ranks split the weights between them (for the memory bound)."""
        return tp if cls.tp_over_world else world


class Strategy(Protocol):
    """``phases(opts)`` yields phase names; after each, ``self.model`` is the current model."""

    name: str
    memory_strategy: str  # the row of the memory-bound table this strategy follows
    tp_over_world: bool
    fine_tuning: bool
    adapters: bool
    adapters_under_tp: bool
    whole_model_on_rank0: bool
    library_slack: int
    model: nn.Module | None

    def unavailable(self) -> str | None:
        """Why this strategy cannot run here (None when it can)."""
        ...

    def phase_names(self, opts: RunOptions) -> tuple[str, ...]:
        """The names ``phases`` yields, in order."""
        ...

    def phases(self, opts: RunOptions) -> Iterator[str]: ...


def device_of(opts: RunOptions) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA, else CPU."""
    if opts.device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(opts.device)


def load_kwargs(opts: RunOptions) -> dict:
    """``from_pretrained`` keywords every strategy passes: the dtype and config overrides."""
    dtype = {dtype_kwarg(): opts.dtype} if opts.dtype is not None else {}
    return {**opts.config_overrides, **dtype}


def with_adapters(model: nn.Module, opts: RunOptions, rank: int) -> nn.Module:
    """``model`` with the PEFT adapters ``opts`` asks for (unchanged when none): a new LoRA
    initialised by PEFT (on meta where the model is), or a trained adapter that ``rank`` 0
    reads (``reference_impl.attach_adapter``)."""
    if not opts.adapted:
        return model
    from reference_impl import attach_adapter

    config = opts.lora.peft_config() if opts.lora is not None else None
    return attach_adapter(model, peft_config=config, adapter_dir=opts.adapter_dir, rank=rank)
