"""Naming and viewing tensors the same way whatever wraps the model.

A leaf module (torch only) shared by the checks and by ``reference_impl``: FSDP1 prefixes
names with ``_fsdp_wrapped_module.``, activation checkpointing and ``torch.compile`` add their
own prefixes, FSDP2 and TP hold DTensors. Everything here maps those back to the names and
the local data a user would recognise.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``model._fsdp_wrapped_module.layers.0...`` -> ``model.layers.0...``."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """The data this rank holds: the local shard of a DTensor, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer once, under its first clean name (parameters first)."""
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            yield clean_name(name), tensor


def tie_groups(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """Parameters registered under more than one name, as ``(full name, module, attr)`` lists.

    Shared storage, not equal values, is what a tie means: a gradient must reach both uses.
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                full = clean_name(f"{module_name}.{attr}" if module_name else attr)
                owners.setdefault(id(param), []).append((full, module, attr))
    return [group for group in owners.values() if len(group) > 1]


def describe_diff(seen: torch.Tensor, expected: torch.Tensor) -> tuple[str, str, str]:
    """(expected, seen, detail) words for two same-shape tensors that differ."""
    if seen.shape != expected.shape:
        return f"shape {tuple(expected.shape)}", f"shape {tuple(seen.shape)}", "shape differs"
    a = seen.detach().float().cpu().reshape(-1)
    b = expected.detach().float().cpu().reshape(-1)
    differ = (a != b) & ~(torch.isnan(a) & torch.isnan(b))
    count = int(differ.sum())
    first = int(differ.nonzero()[0]) if count else 0
    diff = (a - b).abs().nan_to_num(float("inf"))
    return (
        f"{b[first].item():.6g} at flat index {first}",
        f"{a[first].item():.6g}",
        f"{count} of {a.numel()} elements differ, max |diff| {diff.max().item():.3g}",
    )
