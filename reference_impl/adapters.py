"""PEFT models in the recipe: the transformers model inside, a tensor's name in that model, the
rule that initialises an adapter, and adapters attached after rank-0 loading.

A ``PeftModel`` wraps the ``PreTrainedModel`` (``model.get_base_model()``) and renames what it
wraps: ``base_model.model.`` in front, ``.base_layer`` for a layer that got an adapter,
``.original_module`` / ``.modules_to_save.<adapter>`` for a ``modules_to_save`` copy. PEFT is
an optional dependency: nothing here imports it until an adapter is attached.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

# The segments PEFT inserts into the name of a tensor it wraps.
_PEFT_SEGMENTS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.|$)")
# init_lora_weights values PEFT's reset_lora_parameters implements; the others (PiSSA, OLoRA,
# LoftQ, EVA, CorDA, orthogonal...) are computed from the base weights, which a meta rank does
# not hold: there the default rule fills the adapter until rank 0's values arrive.
_RESETTABLE = (True, False, "gaussian")


def transformers_model_of(model: nn.Module) -> PreTrainedModel | None:
    """The ``PreTrainedModel`` a model is or wraps (a PEFT model's base model), else None."""
    if isinstance(model, PreTrainedModel):
        return model
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else None
    return base if isinstance(base, PreTrainedModel) else None


def is_peft_model(model: nn.Module) -> bool:
    """True for a model with PEFT adapters (a ``PeftModel`` or a bare tuner model)."""
    return isinstance(getattr(model, "peft_config", None), dict)


def name_mapper(model: nn.Module) -> Callable[[str], str]:
    """``fn(name in model) -> name in its transformers model``: identity for a plain model;
    for a PEFT model, the wrapping prefix and PEFT's segments removed (both copies of a
    ``modules_to_save`` module map to the one name the base model had)."""
    base = transformers_model_of(model)
    if base is None or base is model:
        return lambda name: name
    prefix = next(n for n, m in model.named_modules() if m is base)

    def to_base(name: str) -> str:
        if prefix and name.startswith(prefix + "."):
            name = name[len(prefix) + 1:]
        return _PEFT_SEGMENTS.sub("", name)

    return to_base


def lora_init_rules(model: nn.Module) -> dict[int, Callable[[], None]]:
    """For each module that holds LoRA adapter tensors (a ``lora_A[adapter]`` Linear, a
    ``lora_embedding_A`` ParameterDict...), by ``id``: PEFT's own ``reset_lora_parameters``
    on its layer with the adapter's ``init_lora_weights``, touching that module's tensors only.
    """
    configs = getattr(model, "peft_config", None) or {}
    rules: dict[int, Callable[[], None]] = {}
    for layer in model.modules():
        if not callable(getattr(layer, "reset_lora_parameters", None)):
            continue
        for attr in getattr(layer, "adapter_layer_names", ()):
            container = getattr(layer, attr, None)
            if isinstance(container, nn.ModuleDict):
                for adapter, child in container.items():
                    rules[id(child)] = functools.partial(
                        _reset_only, layer, attr, [adapter], configs)
            elif isinstance(container, nn.ParameterDict) and len(container):
                rules[id(container)] = functools.partial(
                    _reset_only, layer, attr, list(container.keys()), configs)
    return rules


def _reset_only(layer: nn.Module, keep: str, adapters: list[str], configs: dict[str, Any]) -> None:
    """``layer.reset_lora_parameters`` for ``adapters``, with every adapter container but
    ``keep`` replaced by a meta stand-in for the call: PEFT's rule resets ``lora_A`` and
    ``lora_B`` together, and under FSDP1 the other one may already be flattened and freed
    (writing to it crashes) or still on meta."""
    saved = {attr: layer._modules[attr] for attr in layer.adapter_layer_names
             if attr != keep and layer._modules.get(attr) is not None}
    try:
        for attr, container in saved.items():
            layer._modules[attr] = _meta_stand_in(container)
        for adapter in adapters:
            rule = getattr(configs.get(adapter), "init_lora_weights", True)
            if isinstance(rule, str):
                rule = rule.lower()
            if rule is False:  # PEFT keeps what the constructor drew
                _constructor_init(layer._modules[keep][adapter])
            else:
                layer.reset_lora_parameters(adapter, rule if rule in _RESETTABLE else True)
    finally:
        layer._modules.update(saved)


def _constructor_init(item: nn.Module | nn.Parameter) -> None:
    """What ``update_layer`` draws before any LoRA rule: ``nn.Linear``'s own init for
    ``lora_A``/``lora_B``, ``torch.randn`` for the embedding adapters."""
    if isinstance(item, nn.Parameter):
        nn.init.normal_(item)
    else:
        item.reset_parameters()


def _meta_stand_in(container: nn.Module) -> nn.Module:
    """Same keys, each a 1x1 meta tensor (with a bias): PEFT's init runs on it and does nothing."""
    if isinstance(container, nn.ParameterDict):
        return nn.ParameterDict(
            {key: nn.Parameter(torch.empty(1, 1, device="meta")) for key in container})
    return nn.ModuleDict({key: nn.Linear(1, 1, device="meta") for key in container})


def attach_adapter(
    model: PreTrainedModel,
    *,
    peft_config: Any = None,
    adapter_dir: str | os.PathLike | None = None,
    rank: int = 0,
) -> nn.Module:
    """Add PEFT adapters to a rank-0-loaded model, on every rank, before wrapping.

    Args:
        model: from ``load_on_rank0``: real on rank 0, meta elsewhere.
        peft_config: a new adapter (``LoraConfig(...)``): PEFT initialises it on rank 0; on
            meta ranks it stays on meta for ``DelayedParamIniter``, and rank 0's values reach
            every rank when the model is wrapped.
        adapter_dir: a trained adapter to go on training: rank 0 reads its weights; the others
            read only its config (the same structure, on meta).
        rank: this rank (only rank 0 reads adapter weights).

    Returns:
        The ``PeftModel``, with trainable adapters (``requires_grad`` as for training).

    Raises:
        ValueError: neither or both of ``peft_config`` and ``adapter_dir``.
    """
    from peft import PeftConfig, PeftModel, get_peft_model

    if (peft_config is None) == (adapter_dir is None):
        raise ValueError("pass exactly one of peft_config (a new adapter) and adapter_dir")
    if peft_config is not None:
        return get_peft_model(model, peft_config)
    if rank == 0:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = False
    return get_peft_model(model, config)
