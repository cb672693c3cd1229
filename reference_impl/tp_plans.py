"""Tensor-parallel plans for Hugging Face models, and the checks that run before any collective.

The plans come from the models themselves where they are right: ``config.base_model_tp_plan``
(attention q/k/v column-parallel, output row-parallel; MLP gate/up column, down row) and the
head's ``_tp_plan`` (``lm_head`` column-parallel, logits gathered). What this module adds:

* The input embedding, vocab-parallel (``RowwiseParallel`` over the vocabulary), which only
  GPT-NeoX declares. Our own entry, for every family.
* Only entries whose target is an ``nn.Linear`` or ``nn.Embedding`` are applied: PyTorch's
  styles shard those. Mixtral's expert entries (``packed_colwise`` on fused 3-D ``gate_up_proj``,
  ``moe_tp_experts``) target fused parameters; a plain column split of a packed gate/up weight
  would hand each rank the wrong half, so the experts stay replicated (attention, embedding and
  head are still sharded) and :func:`build_plan` reports them as skipped.
* GPT-NeoX's fused ``query_key_value`` is laid out per head (``[q_h, k_h, v_h]`` for each head
  ``h``), so a contiguous column split gives each rank whole heads: the declared ``colwise`` is
  right for it. (A layout of ``[all q | all k | all v]`` would not be.)
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt_neox", "mixtral")


class TPConfigError(ValueError):
    """A tensor-parallel configuration that cannot work, found before any collective."""


def _style(kind: str) -> ParallelStyle | None:
    """PyTorch's style for one of transformers' plan strings (None: not translatable)."""
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    if kind in ("colwise_gather_output", "colwise_rep"):  # transformers 5's name, 4.x's
        return ColwiseParallel(output_layouts=Replicate())
    if kind == "embedding_rowwise":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    return None


@dataclass
class TPPlan:
    """What :func:`build_plan` decided: module name -> style, and what stays replicated."""

    styles: dict[str, ParallelStyle]
    skipped: dict[str, str] = field(default_factory=dict)


def check_tp_config(config, tp_size: int, world_size: int) -> None:
    """Raise :class:`TPConfigError` naming the numbers and the fix, before any collective."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TPConfigError(
            f"tensor parallelism is not supported for model_type={model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Run it without TP (tp_size=1)."
        )
    if tp_size < 1 or world_size % tp_size:
        raise TPConfigError(
            f"tp_size={tp_size} does not divide the world size {world_size}; use a divisor "
            f"of {world_size}: {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    sizes = {
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.intermediate_size,
    }
    if getattr(config, "num_local_experts", None):  # experts stay replicated: MLP not split
        del sizes["intermediate_size"]
    for name, value in sizes.items():
        if value % tp_size:
            usable = [d for d in range(1, value + 1) if value % d == 0 and world_size % d == 0]
            fix = (
                "pad the vocabulary to a multiple of tp_size (model.resize_token_embeddings)"
                if name == "vocab_size"
                else f"use a tp_size that divides it: {usable}"
            )
            raise TPConfigError(
                f"{name}={value} is not divisible by tp_size={tp_size}: each TP rank must hold "
                f"an equal, whole part of it ({model_type}); {fix}"
            )


def _base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def _declared_plan(model: nn.Module) -> dict[str, str]:
    """transformers' plan for the whole model: the base model's plan under its prefix, the
    head's ``_tp_plan``, and the input embedding (ours) when the model declares none."""
    plan = {
        f"{_base_prefix(model)}{k}": v
        for k, v in (getattr(model.config, "base_model_tp_plan", None) or {}).items()
    }
    plan.update(getattr(model, "_tp_plan", None) or {})
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    if not any(fnmatch.fnmatchcase(embed_name, pattern) for pattern in plan):
        plan[embed_name] = "embedding_rowwise"
    return plan


def build_plan(model: nn.Module) -> TPPlan:
    """Concrete module names -> PyTorch parallel styles for ``model``.

    Each plan pattern (``layers.*.self_attn.q_proj``) is matched against the module names;
    a pattern whose target is not a Linear or Embedding, or whose kind PyTorch has no style
    for, is reported in ``skipped`` and the target stays replicated.
    """
    modules = dict(model.named_modules())
    params = {n for n, _ in model.named_parameters()}
    styles: dict[str, ParallelStyle] = {}
    skipped: dict[str, str] = {}
    for pattern, kind in _declared_plan(model).items():
        targets = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
        targets += [n for n in params if fnmatch.fnmatchcase(n, pattern)]
        for name in targets:
            target = modules.get(name)
            style = _style(kind)
            if style is None or not isinstance(target, (nn.Linear, nn.Embedding)):
                skipped[name] = kind
            else:
                styles[name] = style
    if skipped:
        logger.info(
            "TP plan: %d targets stay replicated (no PyTorch style or not a Linear/Embedding): %s",
            len(skipped),
            sorted(set(skipped.values())),
        )
    return TPPlan(styles, skipped)
