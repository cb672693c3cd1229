"""What each rank holds of each tensor, whatever wrapped the model.

A :class:`Piece` is one rank's part of one named tensor: the whole tensor (plain modules,
replicated buffers), a DTensor's local shard (TP, FSDP2, both), or a range of the flattened
tensor inside an FSDP1 ``FlatParameter`` (``use_orig_params`` on or off). Each piece knows

* its :class:`~smpcheck.shards.selection.Selection`: which elements of the full tensor it holds, so
  checks read exactly those from a checkpoint, or cut them from a dense model, without
  gathering anything, and
* its ``replica_key``: pieces with equal keys on different ranks must hold equal values
  (replicated tensors, TP shards across data-parallel replicas, HSDP replicas).

DeepSpeed ZeRO-3 partitions each parameter as it is built: the parameter itself is empty,
``param.ds_tensor`` holds this rank's run of the flattened tensor (``ds_shape`` the full
shape), padded at the end of the last partitions. That is an FSDP1 flat range of a whole
tensor, so a ZeRO-3 partition is a ``flat`` piece, its padding excluded, read from
DeepSpeed's own partition attributes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from smpcheck.shards.selection import Selection, dtensor_runs, flat_selection
from smpcheck.shards.tensors import clean_name


def splits(placement: Any) -> bool:
    """True for placements that give each coordinate different data (Shard, _StridedShard):
    anything but Replicate and Partial."""
    return not (placement.is_replicate() or placement.is_partial())


@dataclass
class Piece:
    """One rank's part of one named tensor."""

    name: str
    data: torch.Tensor
    is_param: bool
    persistent: bool = True
    kind: str = "full"  # "full" | "dtensor" | "flat"
    mesh: Any = None
    placements: tuple = ()
    flat_range: tuple[int, int] | None = None  # [start, stop) of the flattened tensor
    shard_coords: tuple = field(default_factory=tuple)
    shape: tuple[int, ...] | None = None  # the full tensor's shape (default: the data's)
    fsdp_mesh_dims: int = 0  # leading mesh dims that FSDP2 shards over; the rest are TP's

    @property
    def tp_splits(self) -> list[tuple[int, Any]]:
        """(mesh dim, placement) of the tensor-parallel splits: FSDP's are excluded, since
        FSDP gathers its shards before computing and may cut anywhere."""
        return [(d, p) for d, p in enumerate(self.placements)
                if d >= self.fsdp_mesh_dims and splits(p)]

    @property
    def full_shape(self) -> tuple[int, ...]:
        return tuple(self.shape if self.shape is not None else self.data.shape)

    @property
    def selection(self) -> Selection:
        """The elements of the full tensor this piece holds."""
        shape = self.full_shape
        runs = (dtensor_runs(shape, self.mesh, self.placements) if self.placements
                else Selection.whole(shape).runs)
        if self.flat_range is not None:
            return flat_selection(shape, runs, self.flat_range)
        return Selection(shape, runs)

    @property
    def replica_key(self) -> tuple:
        return (self.name, self.kind, self.shard_coords, self.flat_range)

    def where(self) -> str:
        """Human words for which part this is."""
        words = []
        if self.placements:
            shards = [f"{p} at mesh coord {c}" for p, c in
                      zip(self.placements, self.mesh.get_coordinate()) if splits(p)]
            words.append("local shard " + (", ".join(shards) or "(replicated)"))
        if self.flat_range is not None:
            words.append(f"FSDP1 flat elements [{self.flat_range[0]}:{self.flat_range[1]})")
        return " of ".join(reversed(words)) or "whole tensor"

    def expected_from(self, full: torch.Tensor) -> torch.Tensor:
        """The part of ``full`` (the whole expected tensor) this piece should equal."""
        return self.selection.take(full)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside FSDP1/DDP/accelerate wrappers (``.module`` chains) and
    ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``)."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module) and (
                type(model).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel")):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _fsdp1_handles(model: nn.Module) -> list[tuple[str, Any]]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without FSDP1
        return []
    handles = []
    names = {id(m): n for n, m in model.named_modules()}
    for module in FSDP.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is not None:
            handles.append((clean_name(names.get(id(module), "")), handle))
    return handles


def _flat_pieces(prefix: str, handle: Any) -> Iterator[Piece]:
    """FSDP1's flat shard, cut back into per-parameter ranges. A parameter that was a DTensor
    (TP before FSDP1) is flattened from its local TP shard: its placements come along."""
    flat = handle.flat_param
    local = flat.detach()
    extensions = getattr(flat, "_param_extensions", None) or [None] * len(flat._fqns)
    for fqn, info, spec, shape in zip(flat._fqns, flat._shard_param_infos, extensions,
                                      flat._shapes):
        if not info.in_shard:
            continue
        start, numel = info.intra_param_start_idx, info.numel_in_shard
        mesh, placements = getattr(spec, "mesh", None), tuple(getattr(spec, "placements", ()))
        coords = mesh.get_coordinate() if mesh is not None else ()
        yield Piece(
            name=_join(prefix, fqn),
            data=local[info.offset_in_shard:info.offset_in_shard + numel],
            is_param=True, kind="flat", mesh=mesh, placements=placements,
            flat_range=(start, start + numel),
            shard_coords=tuple((d, coords[d]) for d, p in enumerate(placements) if splits(p)),
            shape=tuple(getattr(spec, "shape", shape)),
        )


def iter_pieces(model: nn.Module) -> Iterator[Piece]:
    """Every parameter and buffer piece this rank holds, in the same order on every rank."""
    handles = _fsdp1_handles(model)
    flat_names: set[str] = set()
    for prefix, handle in handles:
        for piece in _flat_pieces(prefix, handle):
            flat_names.add(piece.name)
            yield piece
        for fqn in handle.flat_param._fqns:
            flat_names.add(_join(prefix, fqn))
    seen: set[int] = set()
    fsdp2_dims = _fsdp2_mesh_dims(model)
    non_persistent = {
        clean_name(f"{mn}.{b}" if mn else b)
        for mn, m in model.named_modules()
        for b in m._non_persistent_buffers_set
    }
    tensors = [(n, t, True) for n, t in model.named_parameters()]
    tensors += [(n, t, False) for n, t in model.named_buffers()]
    for raw_name, tensor, is_param in tensors:
        name = clean_name(raw_name)
        if id(tensor) in seen or name in flat_names or "_flat_param" in raw_name:
            continue
        seen.add(id(tensor))
        if is_param and is_zero3(tensor):
            if _zero3_range(tensor)[1] > _zero3_range(tensor)[0]:  # not all padding
                yield _zero3_piece(name, tensor)
            continue
        yield _piece(name, tensor, is_param, name not in non_persistent,
                     fsdp2_dims.get(id(tensor), 0))


def is_zero3(tensor: torch.Tensor) -> bool:
    """A parameter that DeepSpeed ZeRO-3 partitioned (its data lives in ``ds_tensor``)."""
    return getattr(tensor, "ds_tensor", None) is not None and hasattr(tensor, "ds_shape")


def _zero3_range(param: Any) -> tuple[int, int]:
    """[start, stop) of the flattened parameter that this rank's partition holds: partitions
    are equal runs in partition-rank order, the last ones padded past ``ds_numel``."""
    size = param.ds_tensor.numel()
    rank = getattr(param, "ds_zero_partition_rank", None)
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank(group=param.ds_process_group)
    start = min(size * rank, param.ds_numel)
    return start, min(start + size, param.ds_numel)


def _zero3_piece(name: str, param: Any) -> Piece:
    start, stop = _zero3_range(param)
    return Piece(name, param.ds_tensor.detach().reshape(-1)[:stop - start], True, kind="flat",
                 flat_range=(start, stop), shape=tuple(param.ds_shape))


def _fsdp2_mesh_dims(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many leading mesh dims of its DTensor FSDP2 shards over."""
    out: dict[int, int] = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if not callable(get_state):
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.9 keeps one group per module
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fsdp_param in group.fsdp_params:
                mesh = fsdp_param.mesh_info.mesh
                out[id(fsdp_param.sharded_param)] = mesh.ndim if mesh is not None else 0
    return out


def _piece(name: str, tensor: torch.Tensor, is_param: bool, persistent: bool,
           fsdp_mesh_dims: int = 0) -> Piece:
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return Piece(name, tensor.detach(), is_param, persistent)
    mesh = tensor.device_mesh
    coords = mesh.get_coordinate() or ()
    shard_coords = tuple((dim, coords[dim]) for dim, p in enumerate(placements) if splits(p))
    return Piece(
        name,
        tensor.to_local().detach(),
        is_param,
        persistent,
        kind="dtensor",
        mesh=mesh,
        placements=tuple(placements),
        shard_coords=shard_coords,
        shape=tuple(tensor.shape),
        fsdp_mesh_dims=fsdp_mesh_dims,
    )


def flat_full_shapes(model: nn.Module) -> dict[str, tuple[list[int], str]]:
    """Name -> (unsharded shape, dtype) of every parameter held as a flat range: FSDP1's
    (its module attribute is only a view of this rank's flat shard, or absent) and ZeRO-3's
    (the parameter itself is empty)."""
    out = {}
    for prefix, handle in _fsdp1_handles(model):
        flat = handle.flat_param
        for fqn, shape in zip(flat._fqns, flat._shapes):
            out[_join(prefix, fqn)] = (list(shape), str(flat.dtype).replace("torch.", ""))
    for raw, param in model.named_parameters():
        if is_zero3(param):
            out[clean_name(raw)] = (list(param.ds_shape), str(param.dtype).replace("torch.", ""))
    return out


def _join(*parts: str) -> str:
    return clean_name(".".join(p for p in parts if p))


def observed_tie_groups(model: nn.Module) -> list[set[str]]:
    """Names that share one tensor on this rank, including FSDP1's de-duplicated params."""
    from smpcheck.shards.tensors import tie_groups

    groups = [{name for name, _, _ in g} for g in tie_groups(model)]
    for prefix, handle in _fsdp1_handles(model):
        for info in handle.flat_param._shared_param_infos:
            pair = {
                _join(prefix, info.module_name, info.param_name),
                _join(prefix, info.prim_module_name, info.prim_param_name),
            }
            match = next((g for g in groups if g & pair), None)
            if match is None:
                groups.append(pair)
            else:
                match |= pair
    return groups
