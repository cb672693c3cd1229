"""A fresh computation from a config: the model's architecture with parameters on meta and
buffers computed for real (rotary ``inv_freq`` with the model's own rope settings), ties as
the config declares them. Cheap (no weights are allocated) and independent of whatever
initialised the model under test.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
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


_CACHE: OrderedDict[tuple, nn.Module] = OrderedDict()
_CACHE_SIZE = 8


@contextmanager
def outside_zero3() -> Iterator[None]:
    """Build without DeepSpeed ZeRO-3: while an ``HfDeepSpeedConfig`` of stage 3 is alive,
    transformers builds every model inside ``deepspeed.zero.Init``, which would partition the
    skeleton's meta parameters. The setting is restored after."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - a transformers without the integration
        yield
        return
    held = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def _content_key(config: Any) -> str:
    """The config's content, as a cache key. ``repr`` of its dict, not JSON: a value JSON
    cannot hold (an infinite ``time_step_limit`` in the SSM hybrids' configs) must not make
    the skeleton unbuildable."""
    return repr(config.to_dict())


def skeleton_of(cls: type[nn.Module], config: Any) -> nn.Module:
    """A meta-parameter, real-buffer model of class ``cls`` built from ``config``.

    Built from a deep copy of the config object itself, never a JSON round trip: that loses
    what JSON cannot hold, and a config class that subclasses another's would come back with
    the parent's ``model_type`` (and the parent's checkpoint conversions). Cached by content,
    so one ``verify`` builds it once and a config changed in place gets a new skeleton."""
    key = (cls, type(config), _content_key(config))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    with init_empty_weights(), outside_zero3():
        built = cls._from_config(copy.deepcopy(config))
    built.tie_weights()
    _CACHE[key] = built
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return built


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
