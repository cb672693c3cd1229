"""The path most users take: ``from_pretrained`` then ``accelerator.prepare`` under
accelerate's FSDP plugin with ``cpu_ram_efficient_loading``, which is transformers' own rank-0
loading. Measured beside our strategies in ``smpcheck compare``.

Two strategies rather than one with a version option: each is its own row in the comparison,
its own report file (``smpcheck-<strategy>-tp1``) and its own memory bound, with no CLI flag
that means something for one strategy only. ``accelerate-fsdp`` is FSDP2 (the default of
transformers' Trainer), ``accelerate-fsdp1`` the legacy FSDP1 (``sync_module_states``).

Right after loading, every rank probes whether it read the checkpoint itself (two tensors
compared with the files) and the verdict is printed and kept in ``self.environment``: whether
this path still loads on rank 0 only is measured on the installed transformers, not assumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from smpcheck.integrations.accelerate import MEMORY_ROWS, gather_loading
from smpcheck.integrations.loading import probe_loading
from smpcheck.memory.phases import LOAD, WRAP
from smpcheck.run.compat import accelerate_fsdp_unavailable
from smpcheck.strategies.base import RunOptions, StrategyBase, load_kwargs


class _AccelerateFSDP(StrategyBase):
    fsdp_version = 2

    def __init__(self) -> None:
        super().__init__()
        self.environment: dict[str, Any] = {}

    def unavailable(self) -> str | None:
        return accelerate_fsdp_unavailable()

    def phases(self, opts: RunOptions) -> Iterator[str]:
        from transformers import AutoModelForCausalLM

        if opts.tp > 1:
            raise ValueError(f"--strategy {self.name} shards with FSDP only; drop --tp")
        accelerator = self._accelerator(opts)
        self.model = AutoModelForCausalLM.from_pretrained(opts.source.path, **load_kwargs(opts))
        mine = probe_loading(self.model, opts.source.path, dist.get_rank())
        yield LOAD
        optimizer = torch.optim.AdamW(self.model.parameters())  # FSDP2 prepares both at once
        self.model, _ = accelerator.prepare(self.model, optimizer)
        yield WRAP
        self.environment = {"fsdp_version": self.fsdp_version,
                            "cpu_ram_efficient_loading": True, **gather_loading(mine)}
        if dist.get_rank() == 0:
            for line in [self.environment["loading_verdict"], *self.environment["loading"]]:
                print(f"[smpcheck] loading: {line}", flush=True)

    def _accelerator(self, opts: RunOptions) -> Any:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        cpu = not opts.device.startswith("cuda")
        if cpu:
            from smpcheck.integrations.cpu import enable_fsdp_on_cpu

            enable_fsdp_on_cpu()
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=self.fsdp_version, cpu_ram_efficient_loading=True,
            auto_wrap_policy="TRANSFORMER_BASED_WRAP", state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True if self.fsdp_version == 2 else "FULL_SHARD",
            **({"use_orig_params": True} if self.fsdp_version == 1 else {}))
        accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin)
        if accelerator.state.fsdp_plugin is None:  # never train unsharded and call it FSDP
            raise RuntimeError(f"accelerate did not apply the FSDP plugin for {self.name}")
        return accelerator


class AccelerateFSDP2(_AccelerateFSDP):
    """accelerate's FSDP2 plugin: every layer ``fully_shard``-ed on meta, then rank 0's full
    state dict broadcast into the shards; non-persistent buffers re-registered per rank."""

    name = "accelerate-fsdp"
    memory_strategy = MEMORY_ROWS[2]
    fsdp_version = 2


class AccelerateFSDP1(_AccelerateFSDP):
    """accelerate's FSDP1 plugin: ``FullyShardedDataParallel`` with ``sync_module_states``
    (forced by ``cpu_ram_efficient_loading``), rank 0's values broadcast unit by unit."""

    name = "accelerate-fsdp1"
    memory_strategy = MEMORY_ROWS[1]
    fsdp_version = 1
