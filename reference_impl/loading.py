"""Rank-0 loading: the pretrained model on global rank 0, a meta skeleton everywhere else.

Only global rank 0 touches the checkpoint, as in SMP (transformers' own FSDP loading reads it on
each node's *local* rank 0, so a node with a stale copy diverges). Other ranks build the same
architecture from the config under ``accelerate.init_empty_weights()``: parameters on meta,
buffers computed for real, and tied weights re-tied (the tie is broken at construction there).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers renamed `torch_dtype` to `dtype` in 4.56; accept both, pass the one it knows.
_DTYPE_KWARG = "dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype"


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class the checkpoint was saved from (``config.architectures[0]``).

    Falls back to ``AutoModelForCausalLM`` and then ``AutoModel`` when the config names no
    architecture transformers knows.
    """
    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise ValueError(f"no transformers model class for config type {type(config).__name__}")


def resolve_dtype(config: PretrainedConfig, requested: Any) -> torch.dtype:
    """The dtype ``from_pretrained`` gives for ``requested`` (None, "auto" or a dtype).

    transformers 5 loads in the checkpoint's dtype by default; 4.x loads float32.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if isinstance(requested, str) and requested != "auto":
        return getattr(torch, requested)
    saved = getattr(config, _DTYPE_KWARG, None) or getattr(config, "torch_dtype", None)
    if (requested == "auto" or _TRANSFORMERS_MAJOR >= 5) and saved is not None:
        return getattr(torch, saved) if isinstance(saved, str) else saved
    return torch.float32


def build_meta_model(
    config: PretrainedConfig, dtype: torch.dtype, model_class: type[PreTrainedModel] | None = None
) -> PreTrainedModel:
    """The architecture of ``config`` with parameters on meta, real buffers, ties restored."""
    cls = model_class or model_class_for(config)
    with init_empty_weights():
        model = cls._from_config(config, **{_DTYPE_KWARG: dtype})
    model.tie_weights()
    return model.eval()


def load_on_rank0(
    name_or_path: str | os.PathLike,
    *,
    rank: int | None = None,
    model_class: type[PreTrainedModel] | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Pretrained model on global rank 0, the same architecture on meta on every other rank.

    Args:
        name_or_path: checkpoint directory or hub id (resolved by transformers, offline works).
        rank: who is asking; the global rank of the default group when None.
        model_class: class to instantiate; by default the one named in ``config.architectures``.
        **from_pretrained_kwargs: passed to ``from_pretrained`` on rank 0; ``dtype`` (or
            ``torch_dtype``) also sets the meta model's dtype so every rank agrees.

    Returns:
        The model, in eval mode. On rank 0 its weights are the checkpoint's; elsewhere its
        parameters are on meta, ready for ``DelayedParamIniter``.

    Example:
        >>> model = load_on_rank0("/ckpt/llama", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    requested = from_pretrained_kwargs.pop("torch_dtype", None)
    requested = from_pretrained_kwargs.pop("dtype", requested)
    config_kwargs = {
        k: from_pretrained_kwargs[k]
        for k in ("revision", "trust_remote_code", "cache_dir", "local_files_only")
        if k in from_pretrained_kwargs
    }
    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    dtype = resolve_dtype(config, requested)
    cls = model_class or model_class_for(config)
    if rank == 0:
        model = cls.from_pretrained(name_or_path, **{_DTYPE_KWARG: dtype}, **from_pretrained_kwargs)
        return model.eval()
    return build_meta_model(config, dtype, cls)
