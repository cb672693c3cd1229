"""A fresh computation from a config: the model's architecture with parameters on meta and
buffers computed for real (rotary ``inv_freq`` with the model's own rope settings), ties as
the config declares them. Cheap (no weights are allocated) and independent of whatever
initialised the model under test.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

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


@lru_cache(maxsize=8)
def _skeleton_for(cls: type[nn.Module], config_cls: type, config_json: str) -> nn.Module:
    config = config_cls.from_dict(json.loads(config_json))
    with init_empty_weights():
        skeleton = cls._from_config(config)
    skeleton.tie_weights()
    return skeleton


def skeleton_of(cls: type[nn.Module], config: Any) -> nn.Module:
    """A meta-parameter, real-buffer model of class ``cls`` built from ``config``."""
    return _skeleton_for(cls, type(config), config.to_json_string(use_diff=False))


def skeleton(model: nn.Module) -> nn.Module | None:
    """A meta-parameter, real-buffer copy of ``model``'s architecture; None without config."""
    cls, config = model_class(model), getattr(model, "config", None)
    if cls is None or config is None:
        return None
    return skeleton_of(cls, config)


def buffers_of(fresh: nn.Module | None) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (in no state dict) of a skeleton, by name."""
    if fresh is None:
        return {}
    out = {}
    for module_name, module in fresh.named_modules():
        for attr in module._non_persistent_buffers_set:
            buf = module._buffers.get(attr)
            if buf is not None and not buf.is_meta:
                out[f"{module_name}.{attr}" if module_name else attr] = buf
    return out
