"""Beyond plain FSDP: the wrappers training scripts add on top are judged the same, on real
gloo ranks. Activation checkpointing (transformers' own and torch's ``checkpoint_wrapper``),
``torch.compile``, FSDP2 mixed precision and CPU offload: each correct setup passes, and one
element changed on rank 1 is named with its tensor and rank through the wrapper's names."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers as T

import smpcheck
from smpcheck.shards.pieces import iter_pieces
from tests.faults import corrupt

TARGET = "model.layers.1.self_attn.o_proj.weight"
CHECKS = ["preflight", "initialised", "rank_parity", "checkpoint_parity", "coverage",
          "forward"]


def _wrapped(path: str, setup: str) -> torch.nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    model = T.AutoModelForCausalLM.from_pretrained(path)
    options = {}
    if setup == "hf-checkpointing":
        model.gradient_checkpointing_enable()
    elif setup == "torch-checkpointing":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )

        layer = type(model.model.layers[0])
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer))
    elif setup == "mixed-precision":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    elif setup == "cpu-offload":
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for layer in model.model.layers:
        fully_shard(layer, **options)
    model = fully_shard(model, **options)
    return torch.compile(model) if setup == "compile" else model


def verify_wrapped(path: str, setup: str) -> dict:
    model = _wrapped(path, setup)
    checks = [c for c in CHECKS if not (setup == "compile" and c == "forward")]
    out = {}
    for case in ("clean", "planted"):
        if case == "planted" and dist.get_rank() == 1:
            corrupt(next(p for p in iter_pieces(model) if p.name == TARGET).data, "epsilon")
        report = smpcheck.verify(model, checkpoint=path, checks=checks)
        out[case] = {r.name: (r.status.value, sorted({(f.tensor, tuple(f.ranks))
                                                      for f in r.errors}))
                     for r in report.results}
    return out


@pytest.mark.parametrize("setup", ["hf-checkpointing", "torch-checkpointing", "compile",
                                   "mixed-precision", "cpu-offload"])
def test_wrappers_are_judged_through_their_names(ranks, checkpoints, setup) -> None:
    out = ranks(verify_wrapped, 2, args=(str(checkpoints["llama-gqa-untied"]), setup))
    assert out[0] == out[1], "every rank holds the same report"
    clean, planted = out[0]["clean"], out[0]["planted"]
    assert all(status == "pass" for status, _ in clean.values()), clean
    assert planted["checkpoint_parity"] == ("fail", [(TARGET, (1,))]), planted
