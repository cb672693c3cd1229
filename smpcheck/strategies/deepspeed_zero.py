"""DeepSpeed ZeRO, the path the Trainer takes with ``TrainingArguments(deepspeed=...)``:
``HfDeepSpeedConfig`` kept alive during ``from_pretrained`` (under ZeRO-3 transformers then
builds the model inside ``deepspeed.zero.Init``: each parameter partitioned as it is built and
rank 0's weights scattered into the partitions), then ``deepspeed.initialize``.

ZeRO-3 is delayed parameter init by another name; ZeRO-2 keeps the parameters replicated (its
gradients and optimizer state are partitioned). One strategy per stage, as for accelerate's
FSDP versions: each is its own row in ``smpcheck compare`` with its own memory bound.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from smpcheck.memory.phases import LOAD, WRAP
from smpcheck.strategies.base import RunOptions, StrategyBase, load_kwargs

INSTALL = ("DS_BUILD_OPS=0 pip install --no-build-isolation 'smpcheck[deepspeed]' (without "
           "build isolation, or pip fetches a CUDA torch to build it)")


def ds_config(stage: int) -> dict[str, Any]:
    """The smallest ZeRO config a run needs: one micro batch, the given stage, and a torch
    optimizer (DeepSpeed's fused ones need compiled ops)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}


class _DeepSpeedZero(StrategyBase):
    stage = 3
    fine_tuning = False  # the checkpoint's own model, as DeepSpeed loads it
    adapters = False
    # Importing deepspeed and loading its communication op costs the same for any model:
    # +43 MiB anonymous per rank between load and wrap on the 0.4 MiB demo model (CPU).
    library_slack = 96 * 2**20

    def __init__(self) -> None:
        super().__init__()
        self._hf_config: Any = None  # must outlive from_pretrained: transformers holds a weakref
        self.optimizer: Any = None

    def unavailable(self) -> str | None:
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            return f"deepspeed is not installed ({exc}): {INSTALL}"
        return None

    def phases(self, opts: RunOptions) -> Iterator[str]:
        if opts.tp > 1:
            raise ValueError(f"--strategy {self.name} shards with ZeRO only; drop --tp")
        if not opts.device.startswith("cuda"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # gloo, without oneCCL
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        config = ds_config(self.stage)
        self._hf_config = HfDeepSpeedConfig(config)
        self.model = AutoModelForCausalLM.from_pretrained(opts.source.path, **load_kwargs(opts))
        yield LOAD
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)
        self.model = engine.module  # what the training loop's forward runs, partitions inside
        self.optimizer = engine.optimizer  # its fp32 masters are judged by the masters check
        yield WRAP


class DeepSpeedZero3(_DeepSpeedZero):
    """ZeRO-3: parameters partitioned as they are built; no rank holds the whole model."""

    name = "deepspeed-zero3"
    memory_strategy = "deepspeed-zero3"
    stage = 3
    whole_model_on_rank0 = False


class DeepSpeedZero2(_DeepSpeedZero):
    """ZeRO-2: every rank loads and holds the whole model; optimizer state partitioned."""

    name = "deepspeed-zero2"
    memory_strategy = "deepspeed-zero2"
    stage = 2
