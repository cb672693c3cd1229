"""Strategies that run someone else's implementation: transformers' own ``tp_plan`` and real
SMP (``torch.sagemaker``) where it is installed."""

from __future__ import annotations

from collections.abc import Iterator

from smpcheck.memory.phases import LOAD, TRANSFORM, WRAP
from smpcheck.run.compat import tp_plan_unavailable
from smpcheck.strategies.base import (
    RunOptions,
    StrategyBase,
    device_of,
    load_kwargs,
    with_adapters,
)


class TransformersTPPlan(StrategyBase):
    """``from_pretrained(..., tp_plan="auto")`` on every rank (TP over the whole world)."""

    name = "tp_plan"
    memory_strategy = "tp_plan"
    tp_over_world = True
    adapters_under_tp = True  # PEFT shards LoRA along transformers' plan
    whole_model_on_rank0 = False

    def unavailable(self) -> str | None:
        return tp_plan_unavailable()

    def phase_names(self, opts: RunOptions) -> tuple[str, ...]:
        return (LOAD,)  # from_pretrained(tp_plan=...) loads and shards in one step

    def phases(self, opts: RunOptions) -> Iterator[str]:
        import torch
        from transformers import AutoConfig

        from reference_impl.loading import resolve_model_class

        cls = resolve_model_class(opts.model_class, AutoConfig.from_pretrained(opts.source.path))
        torch.manual_seed(0)  # a fresh head outside the plan is drawn on every rank: equally
        self.model = cls.from_pretrained(opts.source.path, tp_plan="auto", **load_kwargs(opts))
        # Every rank holds its shards: each reads the adapter; PEFT syncs LoRA across TP ranks.
        self.model = with_adapters(self.model, opts, rank=0)
        yield LOAD


class SageMakerSMP(StrategyBase):
    """The real SMP v2 library: ``torch.sagemaker.init`` + ``transform`` + FSDP recipe."""

    name = "sagemaker"
    memory_strategy = "smp"
    adapters = False  # SMP's own recipe, which smpcheck does not extend with PEFT

    def unavailable(self) -> str | None:
        try:
            import torch.sagemaker  # noqa: F401
        except ImportError:
            return ("torch.sagemaker (SMP v2) is not installed here: it ships in SageMaker's "
                    "training containers; run --strategy smp for our reference of it")
        return None

    def phase_names(self, opts: RunOptions) -> tuple[str, ...]:
        return (LOAD, TRANSFORM, WRAP)

    def phases(self, opts: RunOptions) -> Iterator[str]:  # pragma: no cover - needs SMP
        from contextlib import nullcontext

        import torch.distributed as dist
        import torch.sagemaker as tsm
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from torch.sagemaker.delayed_param import DelayedParamIniter

        from reference_impl import load_on_rank0
        from reference_impl.fsdp import block_classes

        tsm.init({"tensor_parallel_degree": opts.tp})
        self.model = load_on_rank0(opts.source.path, model_class=opts.model_class,
                                   **load_kwargs(opts))
        yield LOAD
        self.model = tsm.transform(self.model, load_state_dict_from_rank0=True)
        yield TRANSFORM
        initer = DelayedParamIniter(self.model) if dist.get_rank() else None
        with initer.validate_params_and_buffers_inited() if initer else nullcontext():
            self.model = FSDP(
                self.model, auto_wrap_policy=ModuleWrapPolicy(block_classes(self.model)),
                device_id=device_of(opts).index, sync_module_states=True,
                param_init_fn=initer.get_param_init_fn() if initer else None,
                post_param_init_fn=initer.get_post_param_init_fn() if initer else None)
        yield WRAP
