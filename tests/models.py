"""Tiny checkpoints the tests write themselves with ``save_pretrained``.

Every parameter is perturbed with seeded noise before saving, so a norm weight of ones or a
zero bias cannot match the checkpoint by accident.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

_LLAMA_LIKE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

FAMILIES: dict[str, tuple[type[T.PretrainedConfig], dict]] = {
    "llama-gqa-tied": (T.LlamaConfig, {**_LLAMA_LIKE, "tie_word_embeddings": True}),
    "llama-gqa-untied": (T.LlamaConfig, {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    "mistral": (T.MistralConfig, _LLAMA_LIKE),
    "qwen2": (T.Qwen2Config, _LLAMA_LIKE),
    "gpt-neox": (
        T.GPTNeoXConfig,
        dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            max_position_embeddings=64,
        ),
    ),
    "gpt2": (
        T.GPT2Config,
        dict(
            vocab_size=96,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}

# Mixtral: attention TP with experts replicated (its packed expert weights stay whole).
MIXTRAL: tuple[type[T.PretrainedConfig], dict] = (
    T.MixtralConfig, {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2})
# Qwen2-MoE: per-expert gate/up/down fused on load like Mixtral's, plus a shared expert; 5
# experts so that 2 ranks' row shards of the fused experts are uneven (3 + 2).
QWEN2_MOE: tuple[type[T.PretrainedConfig], dict] = (
    T.Qwen2MoeConfig, {**_LLAMA_LIKE, "num_experts": 5, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 48, "shared_expert_intermediate_size": 40})
# MoE families whose experts transformers 5 fuses on load from per-expert checkpoint tensors.
MOE_FAMILIES: dict[str, tuple[type[T.PretrainedConfig], dict]] = {
    "mixtral": MIXTRAL, "qwen2-moe": QWEN2_MOE}


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every parameter (in place), so each value is distinctive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(
                torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.05
            )
    return model


def write_checkpoint(
    config: T.PretrainedConfig, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Build ``config``'s causal LM with distinctive weights and ``save_pretrained`` it."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).to(dtype)
    perturbed(model, seed).save_pretrained(path)
    return path


def write_family(family: str, root: Path, seed: int = 0) -> Path:
    config_cls, kwargs = FAMILIES[family]
    return write_checkpoint(config_cls(**kwargs), root / family, seed)
