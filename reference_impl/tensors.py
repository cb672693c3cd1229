"""Small tensor helpers the recipe needs: names without wrapper prefixes, local shards, ties.

The recipe keeps its own copies of these on purpose: ``smpcheck`` (the oracle) has its own,
and the two must never share code, or one bug (a tie group missed, say) would break the
recipe and hide the breakage from the check at the same time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

# FSDP1, activation checkpointing and torch.compile insert these module names.
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """The user's name of a tensor, with wrapper modules' names removed."""
    return _WRAPPERS.sub("", name)


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's data: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter, then each buffer, once (a tied tensor under its first name)."""
    seen: set[int] = set()
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield clean_name(name), tensor


def tie_groups(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """Parameters registered under several names: ``[(name, owner module, attribute), ...]``
    per shared Parameter object."""
    by_param: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None:
                continue
            name = clean_name(f"{prefix}.{attr}") if prefix else attr
            by_param.setdefault(id(param), []).append((name, module, attr))
    return [owners for owners in by_param.values() if len(owners) > 1]
