"""Build a wrapped model the way a user would, and plant one fault in it on one rank.

Rank functions for the fault-injection suite. ``setups`` build correct models through
``reference_impl`` (FSDP1, FSDP2, TP, TP x FSDP2); ``plant`` corrupts one tensor's local data
on one rank in one of several ways. The checks must find every planted fault, naming the
tensor and the rank, and stay quiet without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

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
from smpcheck.shards.pieces import iter_pieces
from smpcheck.shards.tensors import clean_name

SETUPS = ("fsdp1", "fsdp1-flat", "fsdp2", "tp", "tp-fsdp2")
T = TypeVar("T")


def build(path: str, setup: str) -> tuple[nn.Module, nn.Module | None]:
    """The wrapped model on this rank, and a dense reference for TP setups."""
    rank = dist.get_rank()
    model = load_on_rank0(path)
    initer = DelayedParamIniter(model, device="cpu") if rank else None
    if setup == "fsdp1":
        return apply_fsdp1(model, device="cpu", initer=initer), None
    if setup == "fsdp1-flat":
        return apply_fsdp1(model, device="cpu", initer=initer, use_orig_params=False), None
    if setup == "fsdp2":
        return apply_fsdp2(model, device="cpu", initer=initer), None
    tp = 2
    mesh = build_mesh("cpu", tp)
    model = transform(model, device_mesh=mesh, device="cpu", load_state_dict_from_rank0=True)
    if setup == "tp-fsdp2":
        model = apply_fsdp2(model, device="cpu", mesh=mesh["dp"], load_from_rank0=False)
    return model, load_on_rank0(path, rank=0)


def param_names(model: nn.Module) -> list[str]:
    """Names of parameters with data on this rank (the candidates to corrupt)."""
    return sorted({p.name for p in iter_pieces(model) if p.is_param and p.data.numel() > 1})


@torch.no_grad()
def corrupt(data: torch.Tensor, how: str) -> None:
    """Corrupt ``data`` (a rank's local view) in place."""
    flat = data.view(-1)
    if how == "bitflip":
        flat[:1].view(torch.int32).bitwise_xor_(1 << 3)
    elif how == "epsilon":
        flat[0] = torch.nextafter(flat[0], flat[0] + 1)
    elif how == "permute_rows":
        rows = data.view(data.shape[0], -1) if data.dim() > 1 else flat.view(-1, 1)
        rows.copy_(
            rows.roll(1, dims=0) if not torch.equal(rows, rows.roll(1, dims=0)) else rows + 1
        )
    elif how == "garbage":
        flat.fill_(3.2e34)
    elif how == "nan":
        flat[-1] = float("nan")
    else:
        raise ValueError(how)


def plant(model: nn.Module, tensor: str, how: str) -> None:
    """Corrupt this rank's piece of ``tensor``."""
    piece = next(p for p in iter_pieces(model) if p.name == tensor)
    corrupt(piece.data, how)


def set_tied_param(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    module = dict((clean_name(n), m) for n, m in model.named_modules())[owner]
    module._parameters[attr] = value


def while_planted(pieces: list, fill: Callable[[torch.Tensor], object],
                  judge: Callable[[], T]) -> T:
    """``judge()`` with ``fill`` applied in place to each piece's data, which is restored
    afterwards: one built model serves a clean run and several planted faults."""
    saved = [p.data.clone() for p in pieces]
    with torch.no_grad():
        for piece in pieces:
            fill(piece.data)
    try:
        return judge()
    finally:
        with torch.no_grad():
            for piece, data in zip(pieces, saved):
                piece.data.copy_(data)
