"""A strategy is one way through load -> [transform] -> wrap, run on every rank.

Each strategy yields phases to the job (which times them and samples memory) and ends with
the model the training loop would use. The job never needs to know which strategy it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from smpcheck.source import ModelSource


@dataclass
class RunOptions:
    """What ``smpcheck run`` was asked for, as every rank sees it."""

    source: ModelSource
    strategy: str
    tp: int = 1
    device: str = "cpu"
    dtype: torch.dtype | None = None


class StrategyBase:
    """Defaults shared by every strategy: no model yet, available everywhere."""

    name = ""
    memory_strategy = ""

    def __init__(self) -> None:
        self.model: nn.Module | None = None

    def unavailable(self) -> str | None:
        return None


class Strategy(Protocol):
    """``phases(opts)`` yields phase names; after each, ``self.model`` is the current model."""

    name: str
    memory_strategy: str  # the row of the memory-bound table this strategy follows
    model: nn.Module | None

    def unavailable(self) -> str | None:
        """Why this strategy cannot run here (None when it can)."""
        ...

    def phases(self, opts: RunOptions) -> Iterator[str]: ...


def device_of(opts: RunOptions) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA, else CPU."""
    if opts.device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(opts.device)


def load_kwargs(opts: RunOptions) -> dict:
    return {"dtype": opts.dtype} if opts.dtype is not None else {}
