"""Rank-0 loading: the pretrained model on global rank 0, a meta skeleton everywhere else.

Only global rank 0 touches the checkpoint, as in SMP (transformers' own FSDP loading reads it on
each node's *local* rank 0, so a node with a stale copy diverges). Other ranks build the same
architecture from the config under ``accelerate.init_empty_weights()``: parameters on meta,
buffers computed for real, and tied weights re-tied (the tie is broken at construction there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import transformers
from accelerate import init_empty_weights
from torch import nn
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


def resolve_model_class(
    model_class: type | str | None, config: PretrainedConfig
) -> type[PreTrainedModel]:
    """The concrete class to build: ``model_class`` (a class, an ``AutoModelFor...`` class, or
    either's name in ``transformers``), else the one the checkpoint was saved from.

    Auto classes are resolved here because the meta model is built with ``_from_config``,
    which only concrete classes have.

    Raises:
        ValueError: the name is not a transformers model class, or the auto class has no
            model for this config type.
    """
    if model_class is None:
        return model_class_for(config)
    cls = getattr(transformers, model_class, None) if isinstance(model_class, str) else model_class
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is not None:  # an AutoModelFor... class
        try:
            return mapping[type(config)]
        except KeyError:
            raise ValueError(
                f"{cls.__name__} has no model for config type {type(config).__name__}; pick a "
                f"class this architecture has (its config names {config.architectures})"
            ) from None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"{model_class!r} is not a transformers model class (such as "
                         "AutoModelForSequenceClassification or LlamaForCausalLM)")
    return cls


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


# Where the files come from: every rank reads the config, so both the config and rank 0's
# from_pretrained get these.
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision",
                    "subfolder", "token", "trust_remote_code")
# from_pretrained's own keywords (transformers 5 pops them before it builds the config), so never
# a config override even where a config happens to have an attribute of that name.
_LOADING_KWARGS = frozenset({
    "adapter_kwargs", "adapter_name", "allow_all_kernels", "device_map", "device_mesh",
    "disable_mmap", "distributed_config", "fusion_config", "generation_config", "gguf_file",
    "ignore_mismatched_sizes", "kernel_config", "key_mapping", "max_memory", "offload_buffers",
    "offload_folder", "output_loading_info", "quantization_config", "state_dict", "tp_plan",
    "tp_size", "tqdm_class", "use_kernels", "use_safetensors", "variant", "weights_only",
})


@dataclass(frozen=True)
class LoadSpec:
    """What ``from_pretrained(name_or_path, **kwargs)`` means, split the way transformers splits
    it, so rank 0's real model and every other rank's meta model come from one config.

    Attributes:
        config: the checkpoint's config with every config override applied (``num_labels``,
            ``id2label``, any config attribute).
        model_class: the concrete class to build.
        dtype: the dtype every rank builds in.
        download_kwargs: where the files come from (revision, cache_dir...).
        loading_kwargs: the rest: ``from_pretrained``'s own options, and keywords the config
            does not know, which transformers passes to the model's ``__init__``.
    """

    config: PretrainedConfig
    model_class: type[PreTrainedModel]
    dtype: torch.dtype
    download_kwargs: dict[str, Any] = field(default_factory=dict)
    loading_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """Keywords for the model's ``__init__`` (the meta model gets them too)."""
        return {k: v for k, v in self.loading_kwargs.items() if k not in _LOADING_KWARGS}


def split_from_pretrained_kwargs(
    name_or_path: str | os.PathLike,
    model_class: type | str | None = None,
    **from_pretrained_kwargs: Any,
) -> LoadSpec:
    """Split ``from_pretrained`` keywords into config overrides and loading options, as
    ``PreTrainedModel.from_pretrained`` does (``config_class.from_pretrained(...,
    return_unused_kwargs=True)``): a keyword the config accepts changes the config.

    Args:
        name_or_path: checkpoint directory or hub id.
        model_class: as for :func:`resolve_model_class`.
        **from_pretrained_kwargs: what the user would pass to ``from_pretrained``; a
            ``config=`` object is used as it is (transformers then applies no overrides).

    Returns:
        The config every rank builds from, and the keywords only rank 0's load needs.
    """
    kwargs = dict(from_pretrained_kwargs)
    requested = kwargs.pop("torch_dtype", None)
    requested = kwargs.pop("dtype", requested)
    download = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS if k in kwargs}
    loading = {k: kwargs.pop(k) for k in _LOADING_KWARGS if k in kwargs}
    config = kwargs.pop("config", None)
    if isinstance(config, PretrainedConfig):
        unused = kwargs
    else:
        config, unused = AutoConfig.from_pretrained(
            config or name_or_path, return_unused_kwargs=True, **download, **kwargs)
    return LoadSpec(config=config, model_class=resolve_model_class(model_class, config),
                    dtype=resolve_dtype(config, requested), download_kwargs=download,
                    loading_kwargs={**loading, **unused})


@contextmanager
def init_matrices_empty() -> Iterator[None]:
    """``init_empty_weights`` for parameters of two or more dimensions only: vectors (norm
    weights, biases: a few per layer, a tiny share of the model) keep the values construction
    gives them, which is the only init some releases have for them (transformers 4.50's
    ``LlamaPreTrainedModel._init_weights`` leaves ``LlamaRMSNorm`` to its ``torch.ones``)."""
    register = nn.Module.register_parameter

    def register_matrix_on_meta(module: nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.dim() > 1:
            kwargs = {**param.__dict__, "requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_matrix_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_meta_model(
    config: PretrainedConfig,
    dtype: torch.dtype,
    model_class: type[PreTrainedModel] | None = None,
    *,
    real_vectors: bool = False,
    **init_kwargs: Any,
) -> PreTrainedModel:
    """The architecture of ``config`` with parameters on meta, real buffers, ties restored;
    with ``real_vectors``, parameters of at most one dimension are real too (see
    :func:`init_matrices_empty`)."""
    cls = model_class or model_class_for(config)
    with init_matrices_empty() if real_vectors else init_empty_weights():
        model = cls._from_config(config, **{_DTYPE_KWARG: dtype}, **init_kwargs)
    model.tie_weights()
    return model.eval()


def load_on_rank0(
    name_or_path: str | os.PathLike,
    *,
    rank: int | None = None,
    model_class: type | str | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Pretrained model on global rank 0, the same architecture on meta on every other rank.

    Both come from one config: the keywords that change the config (``num_labels=3``,
    ``id2label``, any config attribute) are applied before either is built, so a new task head
    has the same shape everywhere (FSDP1 otherwise aborts inside the broadcast).

    Args:
        name_or_path: checkpoint directory or hub id (resolved by transformers, offline works).
        rank: who is asking; the global rank of the default group when None.
        model_class: class to instantiate (``LlamaForSequenceClassification``, an
            ``AutoModelFor...`` class, or its name); by default the one named in
            ``config.architectures``.
        **from_pretrained_kwargs: as for ``from_pretrained``; ``dtype`` (or ``torch_dtype``)
            also sets the meta model's dtype so every rank agrees.

    Returns:
        The model, in eval mode. On rank 0 its weights are the checkpoint's (a head the
        checkpoint lacks freshly initialised); elsewhere its parameters are on meta, ready for
        ``DelayedParamIniter``.

    Example:
        >>> model = load_on_rank0("/ckpt/llama", model_class="AutoModelForSequenceClassification",
        ...                       num_labels=3, dtype=torch.bfloat16)  # doctest: +SKIP
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    spec = split_from_pretrained_kwargs(name_or_path, model_class, **from_pretrained_kwargs)
    if rank == 0:
        model = spec.model_class.from_pretrained(
            name_or_path, config=spec.config, **{_DTYPE_KWARG: spec.dtype},
            **spec.download_kwargs, **spec.loading_kwargs)
        return model.eval()
    return build_meta_model(spec.config, spec.dtype, spec.model_class, **spec.init_kwargs)


def resize_vocabulary(model: PreTrainedModel, new_size: int, **kwargs: Any) -> PreTrainedModel:
    """``model.resize_token_embeddings(new_size, **kwargs)`` on every rank of the recipe.

    Rank 0 resizes its loaded model as transformers does (the added rows drawn from the old
    rows' mean and covariance by default). A meta model cannot compute that covariance, and
    need not: its rows are placeholders until rank 0's values are broadcast, so it resizes
    with ``mean_resizing=False``. Both end with the same shapes and ``config.vocab_size``,
    which is all FSDP's broadcast needs.
    """
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:
        kwargs["mean_resizing"] = False
    model.resize_token_embeddings(new_size, **kwargs)
    return model
