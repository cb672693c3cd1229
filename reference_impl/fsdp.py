"""Wrap a rank-0-loaded model with FSDP1 (the SMP recipe) or FSDP2, on any device.

``apply_fsdp1`` is the seed recipe as written: rank 0 passes its real model, the other ranks a
meta model and ``DelayedParamIniter``'s ``param_init_fn``; ``sync_module_states=True``
broadcasts rank 0's parameters and buffers; the constructor runs inside the validator.

``apply_fsdp2`` is its FSDP2 counterpart: ``fully_shard`` on every rank (meta on non-zero
ranks), ``to_empty`` with tensor swapping (so tied parameters stay one object), then
``set_model_state_dict(..., broadcast_from_rank0=True)`` from rank 0's full state dict, then
the non-persistent buffers, which no state dict carries.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp import _init_utils as fsdp1_init_utils
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

from reference_impl.adapters import transformers_model_of
from reference_impl.delayed_param import (
    DelayedParamIniter,
    resolve_device,
    swap_params_on_conversion,
)
from reference_impl.tensors import tie_groups


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The repeated blocks to wrap: the model's ``_no_split_modules`` (decoder layers), else
    the element class of its longest ``nn.ModuleList`` (BERT's encoder layers, say). A PEFT
    model's blocks are those of the transformers model it wraps."""
    hf = transformers_model_of(model)
    names = set(getattr(hf if hf is not None else model, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if classes:
        return classes
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no _no_split_modules and no ModuleList "
                         "of layers; pass blocks= the layer classes to wrap")
    return {type(max(lists, key=len)[0])}


def _trainable_leaf(module: nn.Module) -> bool:
    """A module with no children whose parameters all train: a LoRA ``lora_A``/``lora_B``,
    a ``modules_to_save`` copy, an unfrozen head."""
    params = list(module.parameters(recurse=False))
    return (next(module.children(), None) is None and bool(params)
            and all(p.requires_grad for p in params))


def fsdp1_wrap_policy(model: nn.Module, blocks: set[type[nn.Module]] | None,
                      use_orig_params: bool) -> ModuleWrapPolicy | CustomPolicy:
    """The blocks as units; with flat parameters (``use_orig_params=False``) and a model
    that is partly frozen (PEFT), also every trainable leaf on its own, since one flat
    parameter cannot mix ``requires_grad`` (PEFT's ``fsdp_auto_wrap_policy`` does the same)."""
    classes = tuple(blocks or block_classes(model))
    grads = {p.requires_grad for p in model.parameters()}
    if use_orig_params or len(grads) < 2:
        return ModuleWrapPolicy(classes)
    return CustomPolicy(lambda module: isinstance(module, classes) or _trainable_leaf(module))


@contextmanager
def allow_cpu_sync_module_states(process_group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Let FSDP1's ``sync_module_states`` broadcast CPU tensors over gloo.

    FSDP1 refuses CPU module states with a device guard
    (``_check_module_states_for_sync_module_states``), although gloo broadcasts CPU tensors
    fine: it was written for NCCL. While this context is active, and only when the group's
    backend is gloo, the guard lets all-CPU states through; anything else still meets the
    original guard. Outside the context nothing is patched, so the CUDA/NCCL path is untouched.
    """
    if "gloo" not in str(dist.get_backend(process_group)).lower():
        yield
        return
    original = fsdp1_init_utils._check_module_states_for_sync_module_states

    def guard(module_states: list[torch.Tensor]) -> None:
        if not all(t.device.type == "cpu" for t in module_states):
            original(module_states)

    fsdp1_init_utils._check_module_states_for_sync_module_states = guard
    try:
        yield
    finally:
        fsdp1_init_utils._check_module_states_for_sync_module_states = original


def _refuse_tied_dtensors(model: nn.Module) -> None:
    """FSDP1 loses part of the gradient of a tied DTensor (TP) parameter: measured here, the
    loss matches the dense model at step 1 and drifts from step 2. Refuse it up front."""
    for group in tie_groups(model):
        _, owner, attr = group[0]
        if hasattr(owner._parameters[attr], "placements"):
            names = ", ".join(name for name, _, _ in group)
            raise NotImplementedError(
                f"FSDP1 cannot train the tied tensor-parallel parameter [{names}] correctly "
                "(its gradient drifts from the dense model's after the first step); use FSDP2 "
                "(apply_fsdp2 on the 'dp' mesh) or untie the embeddings"
            )


def _refuse_single_rank_dtensors(model: nn.Module, mesh: DeviceMesh | None,
                                 group: dist.ProcessGroup | None) -> None:
    """FSDP1 over a one-rank data-parallel group with TP (DTensor) parameters mis-flattens
    them (measured: forward fails with "Cannot writeback when the parameter shape changes").
    With one replica there is nothing to shard: apply TP alone."""
    size = mesh.size() if mesh is not None else dist.get_world_size(group)
    if size == 1 and any(hasattr(p, "placements") for p in model.parameters()):
        raise NotImplementedError(
            "FSDP1 over a single-rank data-parallel group cannot wrap tensor-parallel "
            "(DTensor) parameters; with tp == world size there is nothing left to shard, so "
            "use the TP model as it is (or FSDP2)")


def apply_fsdp1(
    model: nn.Module,
    *,
    device: torch.device | str,
    initer: DelayedParamIniter | None = None,
    process_group: dist.ProcessGroup | None = None,
    device_mesh: DeviceMesh | None = None,
    blocks: set[type[nn.Module]] | None = None,
    use_orig_params: bool = True,
    **fsdp_kwargs,
) -> FSDP:
    """The SMP v2 recipe with FSDP1: ``sync_module_states`` plus ``param_init_fn``.

    Args:
        model: rank 0's real model, or a meta model on other ranks.
        device: the compute device (``"cpu"`` with gloo, ``"cuda:N"`` with NCCL).
        initer: ``DelayedParamIniter(model)`` on non-zero ranks, None on rank 0.
        process_group, device_mesh: the data-parallel group (default: the world).
        blocks: classes to wrap as units; the model's decoder layers by default.
        use_orig_params: FSDP1's flag (True keeps per-parameter views, needed for TP).
        **fsdp_kwargs: anything else FSDP accepts (mixed_precision, sharding_strategy...).

    Returns:
        The FSDP-wrapped model, with every rank holding rank 0's values.

    Raises:
        ParamInitError: a tensor on a non-zero rank was not initialised (from the validator).
    """
    _refuse_tied_dtensors(model)
    _refuse_single_rank_dtensors(model, device_mesh, process_group)
    device = resolve_device(device)
    group = device_mesh.get_group() if device_mesh is not None else process_group
    validate = initer.validate_params_and_buffers_inited() if initer else nullcontext()
    cpu_shim = allow_cpu_sync_module_states(group) if device.type == "cpu" else nullcontext()
    with validate, cpu_shim:
        return FSDP(
            model,
            auto_wrap_policy=fsdp1_wrap_policy(model, blocks, use_orig_params),
            device_id=device if device.type == "cpu" else device.index,
            sync_module_states=True,
            param_init_fn=initer.get_param_init_fn() if initer else None,
            process_group=None if device_mesh is not None else process_group,
            device_mesh=device_mesh,
            use_orig_params=use_orig_params,
            **fsdp_kwargs,
        )


def apply_fsdp2(
    model: nn.Module,
    *,
    device: torch.device | str,
    initer: DelayedParamIniter | None = None,
    mesh: DeviceMesh | None = None,
    blocks: set[type[nn.Module]] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    load_from_rank0: bool = True,
) -> nn.Module:
    """FSDP2 with weights broadcast from rank 0's full state dict.

    Args:
        model: rank 0's real model, or a meta model on other ranks.
        device: the compute device.
        initer: ``DelayedParamIniter(model)`` on non-zero ranks (restores buffers and ties,
            validates); None on rank 0.
        mesh: the data-parallel mesh (default: 1-D over the world on ``device``).
        blocks: classes to shard as units; the model's decoder layers by default.
        mp_policy: FSDP2 mixed precision.
        load_from_rank0: broadcast rank 0's state dict after sharding; False when every
            rank already holds its values (after ``transform(load_state_dict_from_rank0=True)``).

    Returns:
        The same module, now an ``FSDPModule`` whose shards hold rank 0's values.
    """
    device = resolve_device(device)
    rank = dist.get_rank()
    full_state = model.state_dict() if rank == 0 and load_from_rank0 else {}
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    shard = functools.partial(
        fully_shard, mesh=mesh, **({"mp_policy": mp_policy} if mp_policy else {})
    )
    wrap_classes = tuple(blocks or block_classes(model))
    validate = initer.validate_params_and_buffers_inited() if initer else nullcontext()
    with validate:
        for module in model.modules():
            if isinstance(module, wrap_classes):
                shard(module)
        shard(model)
        if initer is not None:
            with swap_params_on_conversion():
                model.to_empty(device=device)
        if load_from_rank0:
            set_model_state_dict(
                model,
                full_state,
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
            )
        if initer is not None:
            initer.get_post_param_init_fn()(model)
    del full_state
    return model
