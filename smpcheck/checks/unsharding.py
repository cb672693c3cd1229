"""What a forward pass through a sharded model holds, and leaving the model as it was after.

FSDP1 and FSDP2 keep their root unit (embeddings, final norm, head) unsharded after a forward,
for the backward that an inference pass never runs: every unit that was sharded before a
check's pass is resharded after (:func:`training_forward_memory`). The pages glibc keeps after
each unit is freed are handed back as the pass goes, so one unit is unsharded at a time, plus
the root (measured, 270M fp32 Llama on 4 CPU ranks: without either, a rank's anonymous peak
grew by another 32 MiB per layer and kept the 250 MiB root after). Shared by the forward and
tp_numerics checks, and by the memory check, which says what the forward phase added
(:func:`unit_sizes`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the pages the C allocator kept after frees back to the system (glibc's
    ``malloc_trim``; nothing where the C library has none). Frees nothing in use, sets
    nothing for later: a tensor freed on the host is otherwise kept by glibc's arenas."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _fsdp2_groups(module: torch.nn.Module) -> list[Any]:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.10: one group per module
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def _resharders(model: torch.nn.Module) -> list[Callable[[], None]]:
    """For each FSDP unit sharded now, what reshards it if it is unsharded later: the units
    a forward leaves unsharded (the root, for a backward) go back to how they were, and a
    unit the caller left unsharded stays so."""
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    out: list[Callable[[], None]] = []
    for module in model.modules():
        if fsdp2 is not None and isinstance(module, fsdp2):
            groups = _fsdp2_groups(module)
            if groups and all(g.is_sharded for g in groups):
                out.append(functools.partial(_reshard_fsdp2, module, groups))
        elif fsdp1 is not None and isinstance(module, fsdp1):
            handle = getattr(module, "_handle", None)
            if (handle is not None and handle.uses_sharded_strategy
                    and not _fsdp1_unsharded(handle)):
                out.append(functools.partial(_reshard_fsdp1, module, handle))
    return out


def _reshard_fsdp2(module: Any, groups: list[Any]) -> None:
    if not all(g.is_sharded for g in groups):
        module.reshard()


def _fsdp1_unsharded(handle: Any) -> bool:
    """Whether an FSDP1 handle's unsharded flat parameter is allocated (before the first
    forward's lazy init it does not exist yet)."""
    try:
        return not handle.needs_unshard()
    except AttributeError:
        return False


def _reshard_fsdp1(module: Any, handle: Any) -> None:
    if _fsdp1_unsharded(handle):  # the unsharded flat parameter is allocated again
        from torch.distributed.fsdp._runtime_utils import _reshard

        _reshard(module, handle, True)


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a forward unshards one at a time: FSDP1/FSDP2 units, else the blocks the
    model names as unsplittable (the decoder layers a ZeRO-3 forward gathers in turn)."""
    wrappers = tuple(c for c in (_fsdp1_class(), _fsdp2_class()) if c is not None)
    units = [m for m in model.modules() if isinstance(m, wrappers)]
    if units:
        return units
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def training_forward_memory(model: torch.nn.Module) -> Iterator[None]:
    """A pass in the block holds what a training forward under this wrapping needs, and
    leaves the model as it was: freed pages go back to the system before the block and after
    each unit's forward (its unsharded parameters freed, if the wrapper frees them), and every
    FSDP unit that was sharded before the block is sharded after it."""
    resharders = _resharders(model)
    hooks = [unit.register_forward_hook(lambda *_: release_freed_memory())
             for unit in _units(model)]
    release_freed_memory()
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for reshard in resharders:
            reshard()
        release_freed_memory()


@dataclass(frozen=True)
class Units:
    """Bytes a forward holds unsharded per FSDP unit: the root's, the largest other's."""

    root: int
    largest: int
    count: int


def unit_sizes(model: torch.nn.Module) -> Units | None:
    """The unsharded bytes of each FSDP1/FSDP2 unit of ``model`` (this rank's, TP shards
    counted as held), as the root and the largest other unit; None when no FSDP wraps it."""
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    sizes: list[int] = []
    for module in model.modules():
        if fsdp2 is not None and isinstance(module, fsdp2):
            sizes.append(sum(_fsdp2_param_bytes(fp) for g in _fsdp2_groups(module)
                             for fp in g.fsdp_params))
        elif fsdp1 is not None and isinstance(module, fsdp1):
            handle = getattr(module, "_handle", None)
            flat = getattr(handle, "flat_param", None)
            sizes.append(0 if flat is None else
                         flat._unpadded_unsharded_size.numel() * flat.element_size())
    if not sizes:
        return None
    return Units(sizes[0], max(sizes[1:], default=0), len(sizes))


def _fsdp2_param_bytes(fsdp_param: Any) -> int:
    dtype = getattr(fsdp_param, "param_dtype", None) or fsdp_param.sharded_param.dtype
    size = getattr(fsdp_param, "_orig_size", None) or fsdp_param.sharded_param.shape
    return size.numel() * dtype.itemsize
