"""``transform``: make a Hugging Face model tensor-parallel, optionally from rank 0's weights.

With ``load_state_dict_from_rank0=True`` only global rank 0 holds real weights (the others
may be on meta). ``parallelize_module`` would scatter from rank 0 by default, but a meta rank
skips that collective and the group deadlocks; so the plan is applied with
``src_data_rank=None`` (no communication), every rank allocates its own shards, and rank 0
then sends each rank exactly its slice, tensor by tensor: a scatter for sharded tensors, a
broadcast for replicated ones and buffers. No rank other than 0 ever holds a full copy of a
sharded tensor.
"""

from __future__ import annotations

import inspect
import itertools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import parallelize_module

from reference_impl.delayed_param import resolve_device, swap_params_on_conversion
from reference_impl.tensors import local_view, named_tensors, tie_groups
from reference_impl.tp_plans import TPConfigError, build_plan, check_tp_config

_HAS_SRC_DATA_RANK = "src_data_rank" in inspect.signature(parallelize_module).parameters


def tp_submesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The ``"tp"`` dimension of a named mesh, or the mesh itself when it is 1-D."""
    names = device_mesh.mesh_dim_names or ()
    if "tp" in names:
        return device_mesh["tp"]
    if device_mesh.ndim != 1:
        raise TPConfigError(
            f"a {device_mesh.ndim}-D device_mesh needs a dimension named 'tp' "
            f"(it has {names or 'no names'})"
        )
    return device_mesh


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters only: buffers such as rotary ``inv_freq`` stay as built."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                if id(param) not in cast:
                    cast[id(param)] = nn.Parameter(
                        param.detach().to(dtype), requires_grad=param.requires_grad
                    )
                module._parameters[name] = cast[id(param)]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make every name of a tie group refer to its first member's (sharded) parameter."""
    modules = dict(model.named_modules())
    for names in groups:
        owner, _, attr = names[0].rpartition(".")
        primary = modules[owner]._parameters[attr]
        for other in names[1:]:
            other_owner, _, other_attr = other.rpartition(".")
            current = modules[other_owner]._parameters[other_attr]
            placements = getattr(primary, "placements", None), getattr(current, "placements", None)
            if placements[0] != placements[1]:
                raise TPConfigError(
                    f"tied parameters {names[0]} and {other} got different "
                    f"placements {placements}; give both the same TP style"
                )
            modules[other_owner]._parameters[other_attr] = primary


def build_mesh(device: torch.device | str, tp_size: int) -> DeviceMesh:
    """The ``(world // tp_size, tp_size)`` mesh named ``("dp", "tp")``: TP inside each
    data-parallel replica, FSDP across them (pass ``mesh["dp"]`` to FSDP)."""
    world = dist.get_world_size()
    return init_device_mesh(
        torch.device(device).type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp")
    )


def _tp_coordinates(device_mesh: DeviceMesh) -> list[int]:
    """For every global rank, its coordinate along the TP dimension of ``device_mesh``."""
    mesh = device_mesh.mesh
    names = list(device_mesh.mesh_dim_names or ())
    tp_dim = names.index("tp") if "tp" in names else 0
    coords = {
        int(mesh[index]): index[tp_dim]
        for index in itertools.product(*(range(n) for n in mesh.shape))
    }
    missing = [r for r in range(dist.get_world_size()) if r not in coords]
    if missing:
        raise TPConfigError(
            f"ranks {missing} are not in the device_mesh; with "
            "load_state_dict_from_rank0 pass the whole (dp, tp) mesh"
        )
    return [coords[r] for r in sorted(coords)]


@torch.no_grad()
def _send_from_rank0(
    model: nn.Module, full: dict[str, torch.Tensor] | None, coords: list[int], tp_size: int
) -> None:
    """Fill every rank's (already allocated) tensors with rank 0's values, shard by shard."""
    rank = dist.get_rank()
    for name, tensor in named_tensors(model):
        local = local_view(tensor)
        shard_dims = [p.dim for p in getattr(tensor, "placements", ()) if isinstance(p, Shard)]
        if shard_dims:
            chunks = None
            if rank == 0:
                pieces = full[name].chunk(tp_size, dim=shard_dims[0])
                chunks = [pieces[c].to(local.device).contiguous() for c in coords]
            dist.scatter(local, chunks, src=0)
        else:
            if rank == 0:
                local.copy_(full[name])
            dist.broadcast(local, src=0)


def apply_tp_plan(model: nn.Module, tp_mesh: DeviceMesh, *, communicate: bool) -> None:
    """Shard ``model``'s planned Linear/Embedding weights on ``tp_mesh`` and keep ties.

    With ``communicate=False`` no collective runs (``src_data_rank=None``): each rank keeps
    the local slice of whatever it holds, real or meta; the caller fills the shards.
    """
    ties = [[name for name, _, _ in group] for group in tie_groups(model)]
    extra = {} if communicate else {"src_data_rank": None}
    parallelize_module(model, tp_mesh, build_plan(model).styles, **extra)
    _retie(model, ties)


def transform(
    model: nn.Module,
    *,
    tp_size: int | None = None,
    device_mesh: DeviceMesh | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    load_state_dict_from_rank0: bool = False,
) -> nn.Module:
    """Shard ``model`` for tensor parallelism (SMP v2's ``torch.sagemaker.transform``).

    Args:
        model: a Llama, Mistral, Qwen2, GPT-NeoX or Mixtral causal LM. With
            ``load_state_dict_from_rank0`` only rank 0's needs real weights.
        tp_size: TP degree; the world size when neither it nor ``device_mesh`` is given.
        device_mesh: a mesh with a ``"tp"`` dimension (and usually ``"dp"``); built as
            ``(world // tp_size, tp_size)`` named ``("dp", "tp")`` when None.
        device: where the shards live; the current CUDA device if there is one, else CPU.
        dtype: cast floating parameters to this dtype first.
        load_state_dict_from_rank0: every rank receives its shards from rank 0.

    Returns:
        The same model, its planned Linear/Embedding weights now DTensors on the TP mesh.

    Raises:
        TPConfigError: heads, KV heads, vocab or intermediate size not divisible by the TP
            degree, a TP degree that does not divide the world, or an unsupported model;
            raised on every rank before any collective.
    """
    world = dist.get_world_size()
    device = resolve_device(device)
    requested_tp = tp_size or (tp_submesh(device_mesh).size() if device_mesh else world)
    check_tp_config(model.config, requested_tp, world)
    device_mesh = device_mesh or build_mesh(device, requested_tp)
    tp_mesh = tp_submesh(device_mesh)
    if load_state_dict_from_rank0 and not _HAS_SRC_DATA_RANK:
        raise RuntimeError(
            "load_state_dict_from_rank0 needs parallelize_module(src_data_rank=)"
            f", which torch {torch.__version__} lacks; upgrade torch"
        )
    if dtype is not None:
        _cast_parameters(model, dtype)
    rank = dist.get_rank()
    # Detached aliases keep rank 0's data alive through to_empty's in-place swaps.
    full = (
        {name: t.detach() for name, t in named_tensors(model)}
        if load_state_dict_from_rank0 and rank == 0
        else None
    )
    if not load_state_dict_from_rank0:
        model.to(device)
    apply_tp_plan(model, tp_mesh, communicate=not load_state_dict_from_rank0)
    if load_state_dict_from_rank0:
        with swap_params_on_conversion():
            model.to_empty(device=device)
        _send_from_rank0(model, full, _tp_coordinates(device_mesh), tp_mesh.size())
        del full
    return model
