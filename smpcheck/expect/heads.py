"""Attention weights that tensor parallelism splits must hold whole heads.

Each rank of a TP group computes attention for its own heads; a shard that cuts a head in half
loads fine (it is exactly the slice its placement names) and then fails in the first forward's
``view`` (transformers#48307, torchtitan#2574: a TP degree above the number of KV heads). The
check is structural: which rows (or, for the output projection, columns) each rank holds, in
units of ``head_dim``. Attention weights are found by structure (Linear layers inside a module
whose class is an ``...Attention``, with the head arithmetic of the config), not by names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from smpcheck.shards.pieces import Piece
from smpcheck.shards.selection import dtensor_runs
from smpcheck.shards.tensors import clean_name


@dataclass(frozen=True)
class HeadLayout:
    """The config's head arithmetic."""

    heads: int
    kv_heads: int
    head_dim: int

    def row_groups(self) -> dict[int, str]:
        """Output widths of attention projections -> what their rows hold."""
        d = self.head_dim
        return {self.heads * d: f"{self.heads} query heads",
                self.kv_heads * d: f"{self.kv_heads} KV heads",
                (self.heads + 2 * self.kv_heads) * d: f"packed q/k/v of {self.heads}+"
                f"{2 * self.kv_heads} heads",
                3 * self.heads * d: f"packed q/k/v of {3 * self.heads} heads"}


def head_layout(config: Any) -> HeadLayout | None:
    """The head arithmetic of ``config`` (its text part), or None when it names no heads."""
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = {name: _field(text, name) for name in
              ("num_attention_heads", "hidden_size", "head_dim", "num_key_value_heads")}
    if _PER_LAYER in fields.values():
        return None  # layers differ: there is no one head arithmetic to judge by
    heads, hidden = fields["num_attention_heads"], fields["hidden_size"]
    if not isinstance(heads, int) or not isinstance(hidden, int) or not heads:
        return None
    head_dim = fields["head_dim"] or hidden // heads
    kv_heads = fields["num_key_value_heads"] or heads
    if not isinstance(head_dim, int) or not isinstance(kv_heads, int):
        return None
    return HeadLayout(heads, kv_heads, head_dim)


_PER_LAYER = object()  # a field the config refuses to read globally


def _field(config: Any, name: str) -> Any:
    """A config field (None when absent), or ``_PER_LAYER`` where the config holds no single
    value for it: configs whose layers differ refuse a global read."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - transformers' per-layer configs raise their own type
        return _PER_LAYER


def head_split_dims(model: nn.Module, layout: HeadLayout) -> dict[str, tuple[int, str]]:
    """Parameter name -> (the dim that holds heads, what it holds) for attention weights."""
    out: dict[str, tuple[int, str]] = {}
    groups = layout.row_groups()
    for module_name, module in model.named_modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        for child_name, child in module.named_modules():
            weight = getattr(child, "weight", None)
            if not isinstance(child, nn.Linear) or weight is None or not child_name:
                continue
            base = clean_name(f"{module_name}.{child_name}" if module_name else child_name)
            if child.out_features in groups:
                out[f"{base}.weight"] = (0, groups[child.out_features])
                if child.bias is not None:
                    out[f"{base}.bias"] = (0, groups[child.out_features])
            elif child.in_features == layout.heads * layout.head_dim:
                out[f"{base}.weight"] = (1, f"{layout.heads} query heads")
    return out


def tp_runs(piece: Piece, dim: int) -> tuple[tuple[int, int], ...]:
    """Runs of indices along ``dim`` that tensor parallelism (not FSDP) gives this rank."""
    from torch.distributed.tensor import Replicate

    placements = tuple(p if d >= piece.fsdp_mesh_dims else Replicate()
                       for d, p in enumerate(piece.placements))
    return dtensor_runs(piece.full_shape, piece.mesh, placements)[dim]


def split_heads(piece: Piece, dim: int, holds: str, head_dim: int) -> str | None:
    """A sentence when this rank's TP shard of ``piece`` cuts a head; else None."""
    if not piece.tp_splits or piece.mesh is None:
        return None
    runs = tp_runs(piece, dim)
    bad = [(a, b) for a, b in runs if a % head_dim or (b - a) % head_dim]
    if not bad:
        return None
    a, b = bad[0]
    parts = max(piece.mesh.size(d) for d, _ in piece.tp_splits)
    total = piece.full_shape[dim]
    side = "rows" if dim == 0 else "columns"
    return (f"its TP shard holds {side} [{a}:{b}) of {total} ({holds}, head_dim {head_dim}): "
            f"{(b - a) / head_dim:g} heads, not a whole number; a TP degree of {parts} "
            f"cannot split {total // head_dim} heads evenly")
