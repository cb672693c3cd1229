"""The recipe's own safetensors reader: one model tensor at a time, under the model's names.

The streaming loader reads the checkpoint on rank 0 only, one tensor at a time, so it cannot
let ``from_pretrained`` load the whole model. It must still give every tensor the value
``from_pretrained`` gives it, so keys go through the model's own conversion mapping
(transformers' ``rename_source_key``: GPT-NeoX ``embed_out`` -> ``lm_head``, Mixtral's
``block_sparse_moe`` -> ``mlp``), and a tensor that transformers 5 fuses on load from several
checkpoint tensors (MoE experts: per-expert ``w1``/``w3`` -> ``gate_up_proj`` [E, 2I, H]) is
built whole by that model's own ``WeightConverter``, exactly as ``from_pretrained`` builds it.

This module is the recipe's: ``smpcheck`` has its own reader, and the two share no code.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn


class CheckpointReadError(ValueError):
    """The checkpoint directory has no readable safetensors files."""


def _key_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the file that holds it: a sharded set's index, one
    ``model.safetensors``, or ``path`` itself when it is a file."""
    index = path / "model.safetensors.index.json"
    if path.is_dir() and index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointReadError(f"{index} has no weight_map ({exc}); re-save the "
                                      "checkpoint with save_pretrained") from exc
        return {key: path / name for key, name in weight_map.items()}
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointReadError(f"{path} holds no model.safetensors or "
                                  "model.safetensors.index.json; save it with save_pretrained")
    with safe_open(str(file), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), file)


@dataclass
class _Fused:
    """A model tensor built on load from several checkpoint tensors."""

    converter: Any  # transformers' WeightConverter for it
    first: str  # the name from_pretrained renames its sources to (the converter's first output)
    sources: list[tuple[str, str]]  # (source pattern, checkpoint key), in load order


class SafetensorsCheckpoint:
    """A checkpoint read lazily (memory-mapped files), keyed by ``model``'s tensor names.

    Args:
        path: the checkpoint directory (or one ``.safetensors`` file).
        model: the plain model (meta parameters are fine), before FSDP or TP: its state dict
            names decide the renames, as in ``from_pretrained``.
    """

    def __init__(self, path: str | Path, model: nn.Module) -> None:
        self.path = Path(path)
        self.files = _key_files(self.path)
        self._handles: dict[Path, Any] = {}
        self._model = model
        self.key_of: dict[str, str] = {}  # model name -> checkpoint key, renamed one to one
        self._fused: dict[str, _Fused] = {}  # every output name -> its fused group
        self._index(model)

    def _index(self, model: nn.Module) -> None:
        """Rename every key as ``from_pretrained`` does, and group the fused ones."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (
                WeightConverter,
                WeightRenaming,
                dot_natural_key,
                rename_source_key,
            )
        except ImportError:  # transformers 4.x: its key mapping only, nothing fused
            renames = getattr(model, "_checkpoint_conversion_mapping", None) or {}
            for key in self.files:
                name = key
                for pattern, replacement in renames.items():
                    name = re.sub(pattern, replacement, name)
                self.key_of[name] = key
            return
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        names = model.state_dict()
        prefix = model.base_model_prefix
        groups: dict[str, _Fused] = {}
        for key in sorted(self.files, key=dot_natural_key):  # from_pretrained's order
            name, pattern = rename_source_key(key, renamings, converters, prefix, names)
            if name not in names and key in names:  # as from_pretrained: keep the raw name
                name, pattern = rename_source_key(key, [], [], prefix, names)
            if name not in names:
                continue
            if pattern is None:
                self.key_of[name] = key
                continue
            group = groups.setdefault(name, _Fused(by_pattern[pattern], name, []))
            group.sources.append((pattern, key))
        for group in groups.values():
            first_target = group.converter.target_patterns[0]
            head, _, tail = group.first.partition(first_target)
            for target in group.converter.target_patterns:
                self._fused[head + target + tail] = group

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def read(self, key: str) -> torch.Tensor:
        """One checkpoint tensor, as stored."""
        return self._handle(self.files[key]).get_tensor(key)

    def tensor_for(self, names: list[str]) -> torch.Tensor | None:
        """The value ``from_pretrained`` gives the tensor known by ``names`` (a tie group's
        names, or one name), in the stored dtype; None when the checkpoint has none of them.

        A fused tensor is built whole, from all its sources at once, by the model's own
        ``WeightConverter``: rank 0 then holds its sources and the result (about twice the
        tensor) until it is sent.
        """
        prefix = self._model.base_model_prefix + "."
        for name in names:  # 4.x loads base-model keys into a head model (and back)
            for candidate in (name, name.removeprefix(prefix), prefix + name):
                if candidate in self.key_of:
                    return self.read(self.key_of[candidate])
        for name in names:
            if name in self._fused:
                return self._build(name)
        return None

    def _build(self, name: str) -> torch.Tensor:
        group = self._fused[name]
        converter = copy.deepcopy(group.converter)  # from_pretrained uses one per target too
        for pattern, key in group.sources:
            converter.add_tensor(group.first, key, pattern, lambda key=key: self.read(key))
        built = converter.convert(group.first, model=self._model, config=self._model.config)
        value = built[name]
        return value[0] if isinstance(value, list) else value
