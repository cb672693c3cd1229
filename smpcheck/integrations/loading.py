"""Did this rank read the checkpoint itself, or wait for rank 0? A measured answer, per rank.

``cpu_ram_efficient_loading`` is documented as "load the pretrained checkpoint on the first
process only; other processes start with empty weights and receive them by broadcast". Whether
the installed transformers still does that is a fact to measure, not to trust: right after
``from_pretrained``, before any wrapping, each rank compares two of its parameters (the largest
and the last) with the checkpoint files and counts what is left on the meta device. Two
tensors answer the question (loading is all or nothing per rank) and cost two reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from smpcheck.checkpoint import Checkpoint


@dataclass
class RankLoading:
    """What one rank held right after ``from_pretrained``."""

    rank: int
    meta_share: float  # of the parameter elements, still on the meta device
    probed: list[str] = field(default_factory=list)  # tensors compared with the files
    equal: bool = False  # every probed tensor equals its checkpoint tensor, bit for bit

    @property
    def read_checkpoint(self) -> bool:
        return self.equal and self.meta_share == 0.0

    def sentence(self) -> str:
        names = ", ".join(self.probed) or "no tensor found in the checkpoint"
        if self.meta_share >= 0.999:
            return (f"rank {self.rank}: parameters on meta after from_pretrained: it did not "
                    "read the checkpoint (rank 0's broadcast fills them)")
        if self.read_checkpoint:
            return (f"rank {self.rank}: read the checkpoint itself ({names} equal the files "
                    "right after from_pretrained)")
        return (f"rank {self.rank}: did not read the checkpoint ({names} differ from the "
                f"files after from_pretrained; {self.meta_share:.0%} on meta): it waits for "
                "rank 0's broadcast")


def probe_loading(model: nn.Module, checkpoint: str | os.PathLike, rank: int) -> RankLoading:
    """Compare the largest and the last parameter with the checkpoint (local, no collective).

    Call it after ``from_pretrained`` and before ``accelerator.prepare``: afterwards the
    weights have been broadcast and every rank holds the files' values anyway.
    """
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params) or 1
    meta = sum(p.numel() for _, p in params if p.is_meta)
    reader = Checkpoint(checkpoint, model)
    prefix = getattr(model, "base_model_prefix", "") + "."
    candidates = [(n, p, reader.key_for(n, prefix)) for n, p in params if not p.is_meta]
    candidates = [c for c in candidates if c[2] is not None]
    chosen = ([max(candidates, key=lambda c: c[1].numel()), candidates[-1]]
              if candidates else [])
    probed, equal = [], bool(chosen)
    for name, param, key in {c[0]: c for c in chosen}.values():
        probed.append(name)
        stored = reader.read(key)
        equal &= stored.shape == param.shape and _equal_in_chunks(param.detach(), stored)
    return RankLoading(rank, round(meta / total, 4), probed, equal)


def _equal_in_chunks(param: torch.Tensor, stored: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """Bitwise equality after casting the stored tensor to the parameter's dtype, a million
    elements at a time: a whole-tensor cast would add the largest tensor to the loading
    phase's measured peak."""
    seen, files = param.reshape(-1), stored.reshape(-1)
    for start in range(0, seen.numel(), chunk):
        part = files[start:start + chunk].to(seen.dtype)
        if not torch.equal(seen[start:start + chunk].cpu(), part):
            return False
    return True


def loading_verdict(per_rank: list[RankLoading]) -> str:
    """One line for the whole group: rank 0 only, or which other ranks read the files."""
    readers = [r.rank for r in per_rank if r.read_checkpoint]
    others = [r for r in readers if r != 0]
    if readers == [0]:
        return "loaded on rank 0 only: the other ranks waited for its broadcast"
    if not others:
        return "rank 0 did not hold the checkpoint's values after from_pretrained"
    return (f"not on rank 0 only: ranks {others} read the checkpoint too "
            f"({len(readers)} of {len(per_rank)} ranks read it)")
