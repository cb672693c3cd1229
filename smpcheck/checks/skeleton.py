"""A fresh computation from the config: the model's architecture with parameters on meta and
buffers computed for real (rotary ``inv_freq`` with the model's own rope settings), ties as
the config declares them. Cheap (no weights are allocated) and independent of whatever
initialised the model under test.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from accelerate import init_empty_weights
from torch import nn


def model_class(model: nn.Module) -> type[nn.Module] | None:
    """The transformers class of ``model``, looking through FSDP2's generated subclass."""
    from transformers import PreTrainedModel

    for cls in type(model).__mro__:
        if issubclass(cls, PreTrainedModel) and not cls.__name__.startswith("FSDP"):
            return cls
    return None


@lru_cache(maxsize=4)
def _skeleton_for(cls: type[nn.Module], config_cls: type, config_json: str) -> nn.Module:
    config = config_cls.from_dict(json.loads(config_json))
    with init_empty_weights():
        skeleton = cls._from_config(config)
    skeleton.tie_weights()
    return skeleton


def skeleton(model: nn.Module) -> nn.Module | None:
    """A meta-parameter, real-buffer copy of ``model``'s architecture; None without config."""
    cls, config = model_class(model), getattr(model, "config", None)
    if cls is None or config is None:
        return None
    return _skeleton_for(cls, type(config), config.to_json_string(use_diff=False))


def expected_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (in no state dict) as a fresh model computes them, by name."""
    fresh = skeleton(model)
    if fresh is None:
        return {}
    out = {}
    for module_name, module in fresh.named_modules():
        for attr in module._non_persistent_buffers_set:
            buf = module._buffers.get(attr)
            if buf is not None and not buf.is_meta:
                out[f"{module_name}.{attr}" if module_name else attr] = buf
    return out


def expected_tie_groups(model: nn.Module) -> list[set[str]]:
    """Parameter names the config says must share one tensor."""
    from smpcheck.tensors import tie_groups

    fresh = skeleton(model)
    return [] if fresh is None else [{n for n, _, _ in g} for g in tie_groups(fresh)]
