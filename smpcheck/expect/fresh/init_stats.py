"""A few numbers that summarise the values one rank holds of one tensor.

Judging a fresh init needs the shape of the values' distribution, not the values: count,
mean, central moments up to the fourth, extremes, exact zeros and non-finite values. They are
computed where the tensor lives (torch ops on its device, in float64, chunk by chunk so a large
shard needs no float64 copy of itself), then leave the device once as a dozen floats. Moments
of disjoint pieces combine exactly (:func:`merge_stats`), so shards can be judged one by one
and together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from smpcheck.shards.tensors import local_view

#: Elements per float64 chunk: small on CPU, where a fresh temporary of megabytes costs its
#: page faults (one float64 op on 1e6 elements took 4 ms here, numpy's 0.24 ms; shard_stats
#: of 1e6 values takes 8 ms in 2**16 chunks, 24 ms in one, single-threaded); larger on
#: accelerators, where each op costs a launch.
CPU_CHUNK_ELEMENTS = 1 << 16
DEVICE_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ShardStats:
    """Moments and extremes of one piece of a tensor. Picklable, a few dozen bytes.

    Attributes:
        count: elements in the piece, finite or not.
        nonfinite: NaN and +-Inf elements; every other field describes the finite ones.
        zeros: elements exactly equal to 0.
        mean: mean of the finite elements (NaN when there are none).
        m2, m3, m4: sums of the 2nd, 3rd and 4th powers of deviations from ``mean``.
        min, max: extremes of the finite elements (+inf/-inf when there are none).
        dtype: the tensor's dtype as ``str(torch.dtype)``, e.g. ``"torch.bfloat16"``.
    """

    count: int
    nonfinite: int
    zeros: int
    mean: float
    m2: float
    m3: float
    m4: float
    min: float
    max: float
    dtype: str

    @property
    def finite(self) -> int:
        return self.count - self.nonfinite

    @property
    def variance(self) -> float:
        """Population variance of the finite elements."""
        return self.m2 / self.finite if self.finite else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) if self.finite else math.nan

    @property
    def rms(self) -> float:
        """Root mean square about zero: the size of the values themselves."""
        return math.sqrt(self.variance + self.mean**2) if self.finite else math.nan

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite else math.nan

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis (0 for a normal, -1.2 for a uniform); NaN without spread."""
        return self.finite * self.m4 / self.m2**2 - 3.0 if self.m2 > 0 else math.nan

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.removeprefix("torch."))


def _finite_row(chunk: torch.Tensor) -> torch.Tensor:
    """``[finite, nonfinite, zeros, mean, m2, m3, m4, min, max]`` of a chunk whose values are
    all finite, in float64 on the chunk's device, with no host synchronisation."""
    f64 = torch.float64
    n = chunk.numel()
    mean = chunk.sum(dtype=f64) / n
    dev = chunk.to(f64, copy=True).sub_(mean)
    dev2 = dev * dev
    lo, hi = torch.aminmax(chunk)
    return torch.stack([mean.new_tensor(n), mean.new_zeros(()),
                        n - torch.count_nonzero(chunk).to(f64), mean, torch.dot(dev, dev),
                        torch.dot(dev2, dev), torch.dot(dev2, dev2), lo.to(f64), hi.to(f64)])


def _masked_row(chunk: torch.Tensor) -> torch.Tensor:
    """The same row for a chunk that may hold NaN or Inf (the slow path)."""
    x = chunk.to(torch.float64)
    finite = torch.isfinite(x)
    n = finite.sum().to(torch.float64)
    mean = torch.where(finite, x, 0.0).sum() / n
    dev = torch.where(finite, x - mean, 0.0)
    dev2 = dev * dev
    inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    return torch.stack([n, x.numel() - n, (x == 0).sum().to(torch.float64), mean, dev2.sum(),
                        (dev2 * dev).sum(), (dev2 * dev2).sum(),
                        torch.where(finite, x, inf).amin(), torch.where(finite, x, -inf).amax()])


def _combine(a: tuple, b: tuple) -> tuple:
    """Pooled ``(n, mean, m2, m3, m4)`` of two disjoint samples (Pebay's formulas)."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    d = mb - ma
    mean = ma + d * nb / n
    m2 = m2a + m2b + d * d * na * nb / n
    m3 = (m3a + m3b + d**3 * na * nb * (na - nb) / n**2
          + 3 * d * (na * m2b - nb * m2a) / n)
    m4 = (m4a + m4b + d**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
          + 6 * d * d * (na * na * m2b + nb * nb * m2a) / n**2
          + 4 * d * (na * m3b - nb * m3a) / n)
    return n, mean, m2, m3, m4


def _from_rows(rows: Iterable[list[float]], count: int, dtype: str) -> ShardStats:
    moments: tuple = (0, math.nan, 0.0, 0.0, 0.0)
    nonfinite = zeros = 0
    lo, hi = math.inf, -math.inf
    for n, bad, zero, mean, m2, m3, m4, cmin, cmax in rows:
        moments = _combine(moments, (int(n), mean, m2, m3, m4))
        nonfinite += int(bad)
        zeros += int(zero)
        lo, hi = min(lo, cmin), max(hi, cmax)
    _, mean, m2, m3, m4 = moments
    return ShardStats(count=count, nonfinite=nonfinite, zeros=zeros, mean=mean, m2=m2, m3=m3,
                      m4=m4, min=lo, max=hi, dtype=dtype)


def shard_stats(tensor: torch.Tensor, chunk_elements: int | None = None) -> ShardStats:
    """The :class:`ShardStats` of the data this rank holds of ``tensor`` (a DTensor's local
    shard; pass an FSDP1 flat range as the 1-D view it is).

    Runs on the tensor's device, chunk by chunk; the host sees one float64 sum (to choose the
    path: NaN/Inf anywhere make it non-finite) and one small table at the end.

    Example:
        >>> stats = shard_stats(model.score.weight)      # on every rank, for its piece
        >>> stats.std, stats.kurtosis
    """
    data = local_view(tensor).detach()
    dtype = str(data.dtype)
    flat = data.reshape(-1)
    if flat.numel() == 0:
        return _from_rows([], 0, dtype)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    chunk = chunk_elements or (
        CPU_CHUNK_ELEMENTS if flat.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS)
    finite = math.isfinite(flat.sum(dtype=torch.float64).item())
    row = _finite_row if finite else _masked_row
    rows = torch.stack([row(part) for part in flat.split(chunk)])
    return _from_rows(rows.cpu().tolist(), flat.numel(), dtype)


def merge_stats(pieces: Iterable[ShardStats]) -> ShardStats:
    """The stats of the union of disjoint pieces (e.g. every shard of one tensor, once per
    replica group): more evidence than any piece alone.

    Raises:
        ValueError: when pieces of different dtypes are merged, or none are given.
    """
    pieces = list(pieces)
    dtypes = {p.dtype for p in pieces}
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge stats of dtypes {sorted(dtypes) or 'none'}")
    rows = [[p.finite, p.nonfinite, p.zeros, p.mean, p.m2, p.m3, p.m4, p.min, p.max]
            for p in pieces]
    return _from_rows(rows, sum(p.count for p in pieces), dtypes.pop())
