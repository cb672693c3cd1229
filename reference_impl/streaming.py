"""Streaming rank-0 loader: no rank ever holds the whole model, rank 0 one tensor in flight.

The SMP recipe, accelerate's ``cpu_ram_efficient_loading`` and torchtune all hold the whole
model in rank 0's host memory before broadcasting. Here every rank builds the model on meta,
applies TP (optional) and FSDP2 on meta, and allocates only its own shards (``to_empty``).
Rank 0 then reads the safetensors files one tensor at a time (memory-mapped) and sends each
rank its part: a scatter of row blocks for FSDP2's row shards over the world (each rank
receives only its rows), else a broadcast after which every rank keeps only its slice (cut by
DTensor's own placement logic: TP x FSDP2's strided shards, replicated tensors). A tensor that
transformers 5 fuses on load from several checkpoint tensors (MoE experts) is built whole on
rank 0 by the model's own conversion ops, one at a time, and then sent like any other. Peak
anonymous memory: rank 0 its shards plus the tensor read (a fused one: its sources and the
result, about twice the tensor; plus padded copies of uneven row blocks), other ranks their
shards plus one row block, or one whole tensor where broadcast.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import distribute_tensor

from reference_impl.checkpoint import SafetensorsCheckpoint
from reference_impl.delayed_param import (
    DelayedParamIniter,
    resolve_device,
    swap_params_on_conversion,
)
from reference_impl.fsdp import apply_fsdp2
from reference_impl.loading import build_meta_model, resolve_dtype
from reference_impl.tensors import local_view, named_tensors, tie_groups
from reference_impl.tp_plans import check_tp_config
from reference_impl.transform import apply_tp_plan, build_mesh


@torch.no_grad()
def stream_from_rank0(model: nn.Module, ckpt: SafetensorsCheckpoint | None,
                      device: torch.device | str) -> int:
    """Fill ``model``'s (already sharded, already allocated) tensors from the checkpoint,
    read on rank 0 only (``ckpt`` is None elsewhere). Returns the number of tensors streamed.

    Raises:
        KeyError: a persistent model tensor the checkpoint lacks (and no tie covers).
    """
    device = resolve_device(device)
    rank = dist.get_rank()
    partners = {name: [n for n, _, _ in group] for group in tie_groups(model)
                for name, _, _ in group}
    non_persistent = {f"{mn}.{b}" if mn else b for mn, m in model.named_modules()
                      for b in m._non_persistent_buffers_set}
    count = 0
    for name, tensor in named_tensors(model):
        if name in non_persistent:
            continue
        header: list = [None]
        full = None
        if rank == 0:
            # Sent as stored (bf16 stays half the size of an fp32 target); every rank casts
            # only its own part, so no rank ever holds a cast copy of the whole.
            full = ckpt.tensor_for(partners.get(name, [name]))
            if full is not None:
                full = full.to(device=device)
                header[0] = ("ok", (list(full.shape), str(full.dtype).removeprefix("torch.")))
            else:
                header[0] = ("missing", name)
        dist.broadcast_object_list(header, src=0)
        status, detail = header[0]
        if status == "missing":
            raise KeyError(f"{detail} is not in the checkpoint read by rank 0 (under any of "
                           "the model's renames): load a checkpoint saved from this model")
        shape, stored = detail[0], getattr(torch, detail[1])
        if _rows_over_world(tensor):
            _scatter_rows(tensor, full, shape, stored)
        else:
            _broadcast_and_slice(tensor, full, shape, stored, device)
        full = None
        count += 1
    return count


def _rows_over_world(tensor: torch.Tensor) -> bool:
    """A DTensor split by rows over a 1-D mesh of the whole world (FSDP2 without TP)."""
    placements = getattr(tensor, "placements", None)
    return (placements is not None and len(placements) == 1 and placements[0].is_shard(0)
            and tensor.device_mesh.size() == dist.get_world_size())


def _scatter_rows(tensor: torch.Tensor, full: torch.Tensor | None, shape: list[int],
                  stored: torch.dtype) -> None:
    """Each rank receives only its rows: DTensor's split (torch.chunk, empty shards at the
    end), padded to equal sizes for the collective; even splits send views, no copies."""
    world = dist.get_world_size()
    rows = -(-shape[0] // world)
    local = local_view(tensor)
    received = torch.empty((rows, *shape[1:]), dtype=stored, device=local.device)
    pieces = None
    if full is not None:
        chunks = list(full.chunk(world, dim=0))
        pieces = []
        for i in range(world):
            chunk = chunks[i] if i < len(chunks) else full[:0]
            if chunk.shape[0] < rows:
                chunk = torch.cat([chunk, chunk.new_zeros((rows - chunk.shape[0], *shape[1:]))])
            pieces.append(chunk.contiguous())
    dist.scatter(received, pieces, src=0)
    local.copy_(received[:local.shape[0]])


def _broadcast_and_slice(tensor: torch.Tensor, full: torch.Tensor | None, shape: list[int],
                         stored: torch.dtype, device: torch.device) -> None:
    """Everyone receives the whole tensor and keeps its slice: any placement, more traffic."""
    if full is None:
        full = torch.empty(shape, dtype=stored, device=device)
    dist.broadcast(full, src=0)
    placements = getattr(tensor, "placements", None)
    mine = full if placements is None else distribute_tensor(
        full, tensor.device_mesh, placements, src_data_rank=None).to_local()
    local_view(tensor).copy_(mine)


def load_streaming(
    path: str | Path,
    *,
    device: torch.device | str,
    tp_size: int = 1,
    mesh: DeviceMesh | None = None,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """The model of ``path``, sharded (TP x FSDP2) and filled by streaming from rank 0.

    Args:
        path: a local checkpoint directory.
        device: where the shards live.
        tp_size: tensor-parallel degree (1: FSDP2 alone over the world).
        mesh: a ``(dp, tp)`` mesh; built from ``tp_size`` when None.
        dtype: the parameters' dtype (default: what ``from_pretrained`` would give).

    Returns:
        An ``FSDPModule`` (over DTensor TP shards when ``tp_size > 1``) bit-identical to the
        SMP recipe's and to ``apply_fsdp2``'s.
    """
    from transformers import AutoConfig

    device = resolve_device(device)
    config = AutoConfig.from_pretrained(path)
    model = build_meta_model(config, resolve_dtype(config, dtype))
    # Key renames are read off the plain class, before FSDP2 subclasses it.
    ckpt = SafetensorsCheckpoint(path, model) if dist.get_rank() == 0 else None
    initer = DelayedParamIniter(model, device=device)
    mesh = mesh or build_mesh(device, tp_size)
    if mesh["tp"].size() > 1:
        check_tp_config(config, mesh["tp"].size(), dist.get_world_size())
        apply_tp_plan(model, mesh["tp"], communicate=False)
    model = apply_fsdp2(model, device=device, mesh=mesh["dp"], load_from_rank0=False)
    with swap_params_on_conversion():
        model.to_empty(device=device)
    stream_from_rank0(model, ckpt, device)
    initer.get_post_param_init_fn()(model)
    return model
