"""The built-in demo model: a tiny Llama (GQA, untied) written once to a local cache, so a
fresh install has something to run with no hub access."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "demo-llama-v1"
DEMO_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   tie_word_embeddings=False)


def cache_dir() -> Path:
    return Path(os.environ.get("SMPCHECK_CACHE", Path.home() / ".cache" / "smpcheck"))


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint, written (atomically, seed 0) on first use."""
    target = cache_dir() / DEMO_NAME
    if (target / "model.safetensors").exists():
        return target
    import torch
    import transformers as T

    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**DEMO_CONFIG))
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: concurrent ranks race, one wins
            os.makedirs(tmp)  # let TemporaryDirectory clean up its (now empty) name
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
    return target
