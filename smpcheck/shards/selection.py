"""Which elements of the full tensor a piece holds, so a rank reads only those from disk.

A :class:`Selection` names, for each dimension of the full (global) tensor, the runs of
indices the piece holds, in the order its local data holds them, and for an FSDP1 flat range
the cut of the flattened result. Reading a selection reads one box per combination of runs:
one box for a plain row or column shard, two for a packed ``[gate | up]`` weight split block by
block (``_StridedShard``), a few rows for an FSDP1 range. Nothing else is read or cast.

The runs come from DTensor's own placement logic applied to an index vector per dimension
(``distribute_tensor`` without communication), so every placement torch knows (``Shard``,
``_StridedShard``, several mesh dimensions on one tensor dimension, uneven sizes) is cut
exactly as DTensor cuts the data itself, with no layout guessed from a tensor's name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

Run = tuple[int, int]  # [start, stop) of global indices along one dimension
Box = tuple[Run, ...]  # one run per dimension: a contiguous block of the full tensor


@dataclass(frozen=True)
class Selection:
    """The part of a full tensor of ``shape`` that one piece holds."""

    shape: tuple[int, ...]
    runs: tuple[tuple[Run, ...], ...]  # per dimension, the runs held, in local order
    flat: Run | None = None  # FSDP1: [start, stop) of the flattened boxes

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Selection:
        return cls(tuple(shape), tuple(((0, n),) for n in shape))

    @property
    def is_whole(self) -> bool:
        return self.flat is None and all(r == ((0, n),) for r, n in zip(self.runs, self.shape))

    def boxes(self) -> Iterator[Box]:
        """Every box to read, in the order :meth:`assemble` puts them together."""
        return itertools.product(*self.runs)

    @property
    def elements_read(self) -> int:
        """Elements in the boxes (an FSDP1 range reads whole rows around its cut)."""
        return math.prod(sum(b - a for a, b in runs) for runs in self.runs)

    def assemble(self, read_box: Callable[[Box], torch.Tensor]) -> torch.Tensor:
        """The piece's expected data: each box read, joined in local order, then cut."""
        if not self.shape:  # a 0-d tensor
            out = read_box(())
        else:
            out = _join(list(self.runs), (), read_box)
        if self.flat is not None:
            out = out.reshape(-1)[self.flat[0]:self.flat[1]]
        return out

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The same part cut from a tensor already in memory (a dense model's)."""
        return self.assemble(lambda box: full[tuple(slice(a, b) for a, b in box)])

    def describe(self) -> str:
        """Human words: ``rows [0:48) of (96, 32)``, ``(96, 32)[:, 16:32]``..."""
        if self.is_whole:
            return f"whole {tuple(self.shape)}"
        dims = ", ".join(":" if r == ((0, n),) else "|".join(f"{a}:{b}" for a, b in r)
                         for r, n in zip(self.runs, self.shape))
        cut = f" flat [{self.flat[0]}:{self.flat[1]})" if self.flat else ""
        return f"{tuple(self.shape)}[{dims}]{cut}"


def _join(runs: list[tuple[Run, ...]], prefix: Box,
          read_box: Callable[[Box], torch.Tensor]) -> torch.Tensor:
    dim = len(prefix)
    if dim == len(runs) - 1:
        parts = [read_box((*prefix, run)) for run in runs[dim]]
    else:
        parts = [_join(runs, (*prefix, run), read_box) for run in runs[dim]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def as_runs(indices: list[int]) -> tuple[Run, ...]:
    """``[0, 1, 2, 8, 9]`` -> ``((0, 3), (8, 10))``, keeping the order given."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((a, b) for a, b in runs)


def _splits_dim(placement: Any, dim: int, ndim: int) -> bool:
    target = getattr(placement, "dim", None)
    return target is not None and not placement.is_replicate() and target % ndim == dim


def _placement_on_vector(placement: Any) -> Any:
    """The same placement, moved to dimension 0 of a 1-D index vector."""
    from torch.distributed.tensor import Replicate, Shard

    split_factor = getattr(placement, "split_factor", None)
    if split_factor is not None:  # _StridedShard: the packed-block split
        return type(placement)(0, split_factor=split_factor)
    return Shard(0) if placement.is_shard() else Replicate()


@lru_cache(maxsize=4096)
def _dim_runs(size: int, mesh: Any, placements: tuple, dim: int, ndim: int) -> tuple[Run, ...]:
    """Runs of indices along ``dim`` that this rank's shard holds."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    mapped = [_placement_on_vector(p) if _splits_dim(p, dim, ndim) else Replicate()
              for p in placements]
    if all(p.is_replicate() for p in mapped):
        return ((0, size),)
    index = torch.arange(size, device=mesh.device_type)
    local = distribute_tensor(index, mesh, mapped, src_data_rank=None).to_local()
    return as_runs(local.cpu().tolist()) or ((0, 0),)  # an empty shard: an empty box


def dtensor_runs(shape: tuple[int, ...], mesh: Any, placements: tuple) -> tuple[tuple[Run, ...],
                                                                                ...]:
    """Per dimension of a DTensor of global ``shape``, the runs this rank holds."""
    return tuple(_dim_runs(n, mesh, tuple(placements), d, len(shape))
                 for d, n in enumerate(shape))


def flat_selection(shape: tuple[int, ...], runs: tuple[tuple[Run, ...], ...],
                   flat: Run) -> Selection:
    """An FSDP1 range ``flat`` of the flattened local tensor (the part given by ``runs``):
    only the local rows that hold the range are read."""
    local_shape = [sum(b - a for a, b in r) for r in runs]
    if not local_shape:
        return Selection(tuple(shape), runs, flat)
    row = math.prod(local_shape[1:])
    first, last = flat[0] // row, -(-flat[1] // row)
    rows = _sub_runs(runs[0], first, last)
    return Selection(tuple(shape), (rows, *runs[1:]), (flat[0] - first * row,
                                                       flat[1] - first * row))


def _sub_runs(runs: tuple[Run, ...], start: int, stop: int) -> tuple[Run, ...]:
    """The local positions [start, stop) of the indices that ``runs`` list, as runs."""
    out, seen = [], 0
    for a, b in runs:
        lo, hi = max(start - seen, 0), min(stop - seen, b - a)
        if lo < hi:
            out.append((a + lo, a + hi))
        seen += b - a
    return tuple(out)
