"""The streaming loader on MoE models whose experts transformers 5 fuses on load (Mixtral,
Qwen2-MoE): bit-identical to ``from_pretrained`` and to the recipe, under FSDP2 and TP x FSDP2,
and through the console script."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as T
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from reference_impl import DelayedParamIniter, apply_fsdp1, load_on_rank0
from reference_impl.streaming import load_streaming
from tests.console import run_cli
from tests.models import MOE_FAMILIES, write_checkpoint
from tests.releases import needs_transformers_5

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: write_checkpoint(cls(**kw), root / name) for name, (cls, kw) in
            MOE_FAMILIES.items()}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The global tensor: a DTensor gathered with its own ``full_tensor()``."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def streamed_against_from_pretrained(path: str, tp: int) -> dict:
    """Every state-dict tensor of the streamed model, gathered, against this rank's own
    ``from_pretrained``; and where the experts and attention ended up."""
    model = load_streaming(path, device="cpu", tp_size=tp)
    loaded = T.AutoModelForCausalLM.from_pretrained(path).state_dict()
    state = model.state_dict()
    differ = sorted(n for n in loaded if n not in state
                    or not torch.equal(_whole(state[n]), loaded[n]))
    watched = ("layers.0.mlp.experts.gate_up_proj", "layers.0.self_attn.q_proj.weight")
    # Per watched tensor: which mesh dimensions shard it.
    layout = {n.removeprefix("model.layers.0."): sorted(
        dim for dim, p in zip(t.device_mesh.mesh_dim_names, t.placements) if not p.is_replicate())
        for n, t in state.items() if n.endswith(watched)}
    local_experts = {n: list(t.to_local().shape) for n, t in state.items() if n.endswith(EXPERTS)}
    return {"differ": differ, "n": len(loaded), "layout": layout, "local": local_experts,
            "fused": sum(n.endswith(EXPERTS) for n in loaded)}


@needs_transformers_5
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_fsdp2_streaming_equals_from_pretrained(ranks, moe, family) -> None:
    results = ranks(streamed_against_from_pretrained, 2, args=(str(moe[family]), 1))
    for res in results:
        assert res["differ"] == [] and res["fused"] == 4 and res["n"] > 20, res
    experts = MOE_FAMILIES[family][1].get("num_local_experts") or MOE_FAMILIES[family][1][
        "num_experts"]
    # Each rank holds its own row block of the fused experts (Qwen2-MoE's 5: 3 + 2 rows).
    rows = [r["local"]["model.layers.0.mlp.experts.down_proj"][0] for r in results]
    assert rows == [-(-experts // 2), experts - -(-experts // 2)]


@needs_transformers_5
def test_mixtral_tp2_on_four_ranks_streams_exactly(ranks, moe) -> None:
    results = ranks(streamed_against_from_pretrained, 4, args=(str(moe["mixtral"]), 2))
    for res in results:
        assert res["differ"] == [] and res["fused"] == 4, res
        # Attention is split over tp; the experts stay whole on tp, rows split over dp.
        assert res["layout"] == {"self_attn.q_proj.weight": ["dp", "tp"],
                                 "mlp.experts.gate_up_proj": ["dp"]}, res


def streamed_against_the_smp_recipe(path: str) -> list[str]:
    """Gathered full state dicts of the streamed model and of the SMP recipe (rank-0 load,
    FSDP1 with ``sync_module_states``): the names that differ."""
    options = StateDictOptions(full_state_dict=True)
    streamed = get_model_state_dict(load_streaming(path, device="cpu"), options=options)
    model = load_on_rank0(path)
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    recipe = get_model_state_dict(apply_fsdp1(model, device="cpu", initer=initer),
                                  options=options)
    return sorted(n for n in recipe if n not in streamed or not torch.equal(streamed[n],
                                                                             recipe[n]))


def test_streaming_equals_the_fsdp1_recipe(ranks, moe) -> None:
    assert ranks(streamed_against_the_smp_recipe, 2, args=(str(moe["qwen2-moe"]),)) == [[], []]


def test_streaming_strategy_runs_mixtral_from_the_console(tmp_path, moe) -> None:
    out = run_cli("run", str(moe["mixtral"]), "--strategy", "streaming", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[smpcheck] load" in out.stdout and "NotImplementedError" not in out.stdout
