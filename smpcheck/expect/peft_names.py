"""PEFT's names, mapped back to the base model's: which tensor of a ``PeftModel`` is a base
weight (expected from the checkpoint), an adapter (expected fresh, or from an adapter file), or
a ``modules_to_save`` copy (expected equal to the module it copies).

PEFT wraps the base model as ``base_model.model.``, moves a wrapped layer's weight under
``.base_layer.``, keeps adapters under ``<layer name>.<adapter name>.`` (``lora_A.default``),
and keeps a trainable copy of each ``modules_to_save`` module under
``.modules_to_save.<adapter name>.`` next to ``.original_module.``. Which attributes are
adapters is read from each tuner layer's own ``adapter_layer_names``, so LoRA, DoRA's
magnitude, IA3 and other tuners are told apart without a list of our own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from smpcheck.shards.tensors import clean_name

BASE = "base"  # a tensor of the base model (possibly under .base_layer.)
ADAPTER = "adapter"  # a tuner's own tensor (lora_A, lora_B, ...)
SAVED_COPY = "saved_copy"  # the trainable copy of a modules_to_save module
ORIGINAL = "original"  # the frozen original of a modules_to_save module


@dataclass(frozen=True)
class PeftView:
    """How one model's names relate to its base model's (identity for a plain model)."""

    base: nn.Module  # the transformers model inside (the model itself when not PEFT)
    prefix: str  # "base_model.model." under PEFT, else ""
    adapter_attrs: tuple[str, ...]  # attribute names of tuner tensors, e.g. lora_A
    adapter_names: tuple[str, ...]  # PEFT adapter names, e.g. default

    @property
    def is_peft(self) -> bool:
        return bool(self.prefix)

    def base_name(self, name: str) -> tuple[str, str]:
        """(the base model's name for ``name``, its role: BASE, ADAPTER, SAVED_COPY or
        ORIGINAL). For an adapter the first element is the adapter file's key."""
        if not self.prefix or not name.startswith(self.prefix):
            return name, BASE
        inner = name[len(self.prefix):]
        adapters = "|".join(map(re.escape, self.adapter_names)) or r"[^.]+"
        if self.adapter_attrs:
            attrs = "|".join(map(re.escape, self.adapter_attrs))
            match = re.search(rf"\.({attrs})\.({adapters})(\.|$)", "." + inner)
            if match:  # adapter files drop the adapter name: lora_A.default.weight -> lora_A.weight
                return self.prefix + re.sub(rf"\.({attrs})\.({adapters})(?=\.|$)", r".\1",
                                            inner, count=1), ADAPTER
        copy = re.sub(rf"\.modules_to_save\.({adapters})(?=\.)", "", inner, count=1)
        if copy != inner:
            return copy, SAVED_COPY
        original = inner.replace(".original_module.", ".", 1)
        if original != inner:
            return original, ORIGINAL
        return inner.replace(".base_layer.", "."), BASE

    def model_name(self, base_name: str) -> str:
        """The inverse for base tensors: where a base model tensor lives in this model."""
        return self.prefix + base_name if self.prefix else base_name


def peft_view(model: nn.Module) -> PeftView:
    """The view of ``model`` (unwrapped from FSDP1/DDP); a plain model maps to itself."""
    get_base = getattr(model, "get_base_model", None)
    if not callable(get_base) or not hasattr(model, "peft_config"):
        return PeftView(model, "", (), ())
    attrs: set[str] = set()
    for module in model.modules():
        attrs.update(getattr(type(module), "adapter_layer_names", ()))
    base = get_base()
    names = {n: m for n, m in model.named_modules()}
    prefix = next((clean_name(n) + "." for n, m in names.items() if m is base and n), "")
    return PeftView(base, prefix, tuple(sorted(attrs)), tuple(model.peft_config))
