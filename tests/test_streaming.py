"""The streaming rank-0 loader: bit-identical to the recipe (FSDP2, TP, TP x FSDP2), and rank
0's memory bounded by the largest tensor, not by the model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers as T
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from reference_impl import DelayedParamIniter, apply_fsdp2, build_mesh, load_on_rank0, transform
from reference_impl.streaming import load_streaming
from smpcheck.memory import MemoryMonitor
from smpcheck.shards.tensors import named_tensors, tie_groups
from tests.models import FAMILIES, write_checkpoint

MIB = 2**20


def recipe(path: str, tp: int, dtype: torch.dtype | None = None):
    """What the recipe gives: FSDP2 from rank 0, or TP from rank 0 then FSDP2 over dp."""
    model = load_on_rank0(path, **({"dtype": dtype} if dtype else {}))
    mesh = build_mesh("cpu", tp)
    if tp > 1:
        model = transform(model, device_mesh=mesh, device="cpu", load_state_dict_from_rank0=True)
        return apply_fsdp2(model, device="cpu", mesh=mesh["dp"], load_from_rank0=False)
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    return apply_fsdp2(model, device="cpu", initer=initer, mesh=mesh["dp"])


def full_state(model) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    buffers = {n: b for n, b in named_tensors(model) if not isinstance(b, torch.nn.Parameter)}
    return {**state, **{f"buffer:{n}": b.clone() for n, b in buffers.items()}}


def streamed_equals_recipe(path: str, tp: int, dtype: torch.dtype | None = None) -> dict:
    streamed = full_state(load_streaming(path, device="cpu", tp_size=tp, dtype=dtype))
    reference = full_state(recipe(path, tp, dtype))
    dtypes = {str(t.dtype) for k, t in streamed.items() if not k.startswith("buffer:")}
    differ = sorted(k for k in reference if k not in streamed
                    or not torch.equal(streamed[k], reference[k]))
    ties = [[n for n, _, _ in g] for g in tie_groups(load_streaming(path, device="cpu",
                                                                    tp_size=tp))]
    return {"differ": differ, "n": len(reference), "ties": ties, "dtypes": dtypes}


@pytest.mark.parametrize(("world", "tp"), [(2, 1), (2, 2), (4, 2)],
                         ids=["fsdp2", "tp2", "tp2xdp2-fsdp2"])
@pytest.mark.parametrize("family", ["llama-gqa-tied", "gpt-neox"])
def test_streaming_is_bit_identical_to_the_recipe(ranks, checkpoints, family, world, tp):
    results = ranks(streamed_equals_recipe, world, args=(str(checkpoints[family]), tp))
    for res in results:
        assert res["n"] > 10 and res["differ"] == [], res
    if family == "llama-gqa-tied":
        assert results[0]["ties"] == [["model.embed_tokens.weight", "lm_head.weight"]]


def rank0_stream_peak(path: str) -> dict:
    with MemoryMonitor(rank=dist.get_rank(), interval=0.002) as mon:
        with mon.phase("stream"):
            model = load_streaming(path, device="cpu")
    shard = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else 0
                for _, t in named_tensors(model))
    return {"growth": mon.record.phase("stream").peak_anon - mon.record.baseline_anon,
            "shard": shard}


def test_rank0_peak_is_bounded_by_the_largest_tensor(ranks, tmp_path) -> None:
    # Two 32 MiB vocab matrices dominate a 70 MiB model.
    config = T.LlamaConfig(**{**FAMILIES["llama-gqa-untied"][1], "vocab_size": 65536,
                              "hidden_size": 128, "intermediate_size": 256})
    path = write_checkpoint(config, tmp_path / "bigvocab")
    model_bytes = sum(p.numel() * 4 for p in T.LlamaForCausalLM(config).parameters())
    largest = 65536 * 128 * 4
    rank0, _ = ranks(rank0_stream_peak, 2, args=(str(path),))
    bound = rank0["shard"] + 2 * largest + 32 * MIB  # shard, read + in flight, allocator slack
    assert rank0["growth"] <= bound, (rank0, bound)
    assert rank0["growth"] < model_bytes, "rank 0 must never hold the whole model"


def test_uneven_row_shards_stream_exactly(ranks, tmp_path) -> None:
    # 3 ranks: every dimension here (97 vocab rows, 32 hidden) splits unevenly.
    config = T.LlamaConfig(**{**FAMILIES["llama-gqa-untied"][1], "vocab_size": 97})
    path = write_checkpoint(config, tmp_path / "odd")
    for res in ranks(streamed_equals_recipe, 3, args=(str(path), 1)):
        assert res["n"] > 10 and res["differ"] == [], res


def test_cast_on_receipt_matches_the_recipe_cast(ranks, tmp_path) -> None:
    # bf16 on disk, fp32 in the model: shards travel as bf16 and each rank casts its own.
    config = T.LlamaConfig(**FAMILIES["llama-gqa-tied"][1])
    path = write_checkpoint(config, tmp_path / "bf16", dtype=torch.bfloat16)
    for tp, world in ((1, 2), (2, 2)):
        for res in ranks(streamed_equals_recipe, world, args=(str(path), tp, torch.float32)):
            assert res["differ"] == [] and res["dtypes"] == {"torch.float32"}, res
