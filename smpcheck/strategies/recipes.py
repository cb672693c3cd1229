"""The strategies built on ``reference_impl``: the SMP recipe (FSDP1), FSDP2 from rank 0, and
naive loading on every rank. With ``--tp`` each applies the TP transform first (on the
``tp`` dimension of a ``(dp, tp)`` mesh) and shards across ``dp``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from reference_impl import (
    DelayedParamIniter,
    apply_fsdp1,
    apply_fsdp2,
    build_mesh,
    load_on_rank0,
    transform,
)
from smpcheck.memory.phases import LOAD, TRANSFORM, WRAP
from smpcheck.strategies.base import (
    RunOptions,
    StrategyBase,
    device_of,
    load_kwargs,
    with_adapters,
)

# Where every rank loads, each draws its own fresh head and adapters: one seed on every rank
# makes them equal, as transformers' Trainer does with set_seed before building the model.
EVERY_RANK_SEED = 0


class _Recipe(StrategyBase):
    every_rank_loads = False

    def phase_names(self, opts: RunOptions) -> tuple[str, ...]:
        wraps = dist.get_world_size() // opts.tp > 1 or opts.tp == 1
        return (LOAD, *((TRANSFORM,) if opts.tp > 1 else ()), *((WRAP,) if wraps else ()))

    def phases(self, opts: RunOptions) -> Iterator[str]:
        rank, device = dist.get_rank(), device_of(opts)
        loader_rank = 0 if self.every_rank_loads else None
        if self.every_rank_loads:
            torch.manual_seed(EVERY_RANK_SEED)
        self.model = load_on_rank0(opts.source.path, rank=loader_rank,
                                   model_class=opts.model_class, **load_kwargs(opts))
        self.model = with_adapters(self.model, opts, 0 if self.every_rank_loads else rank)
        yield LOAD
        mesh = build_mesh(device, opts.tp)
        if opts.tp > 1:
            self.model = transform(self.model, device_mesh=mesh, device=device,
                                   load_state_dict_from_rank0=not self.every_rank_loads)
            yield TRANSFORM
        if mesh["dp"].size() > 1 or opts.tp == 1:  # one replica: TP is all the parallelism
            self.model = self.wrap(self.model, rank, device, mesh, opts)
            yield WRAP

    def wrap(self, model: nn.Module, rank: int, device, mesh, opts: RunOptions) -> nn.Module:
        raise NotImplementedError


class SMPRecipe(_Recipe):
    """Rank 0 loads, others on meta; FSDP1 with sync_module_states and param_init_fn."""

    name = "smp"
    memory_strategy = "smp"

    def wrap(self, model, rank, device, mesh, opts):
        meta = any(p.is_meta for p in model.parameters())
        initer = DelayedParamIniter(model, device=device) if meta else None
        return apply_fsdp1(model, device=device, initer=initer, device_mesh=mesh["dp"])


class FSDP2FromRank0(_Recipe):
    """fully_shard on every rank, weights broadcast from rank 0's full state dict."""

    name = "fsdp2"
    memory_strategy = "fsdp2"

    def wrap(self, model, rank, device, mesh, opts):
        if opts.tp > 1:
            return apply_fsdp2(model, device=device, mesh=mesh["dp"], load_from_rank0=False)
        initer = DelayedParamIniter(model, device=device) if rank else None
        return apply_fsdp2(model, device=device, initer=initer, mesh=mesh["dp"])


class Naive(_Recipe):
    """Every rank loads the whole checkpoint, then FSDP1 shards it: the baseline that runs
    out of host memory with N ranks x the model."""

    name = "naive"
    memory_strategy = "naive"
    every_rank_loads = True

    def wrap(self, model, rank, device, mesh, opts):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from reference_impl.fsdp import block_classes

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy(block_classes(model)),
                    device_id=device if device.type == "cpu" else device.index,
                    device_mesh=mesh["dp"], use_orig_params=True)


class Streaming(StrategyBase):
    """Every rank builds on meta and shards (TP x FSDP2); rank 0 streams the checkpoint one
    tensor at a time, each rank keeping only its slice (``reference_impl.streaming``)."""

    name = "streaming"
    memory_strategy = "streaming"
    fine_tuning = False  # streams the checkpoint's own model
    whole_model_on_rank0 = False  # no rank ever holds it: the point of streaming

    def phase_names(self, opts: RunOptions) -> tuple[str, ...]:
        return (LOAD,)  # each rank shards as it receives: load is the whole of it

    def phases(self, opts: RunOptions) -> Iterator[str]:
        from reference_impl.streaming import load_streaming

        self.model = load_streaming(opts.source.path, device=device_of(opts), tp_size=opts.tp,
                                    dtype=opts.dtype)
        yield LOAD
