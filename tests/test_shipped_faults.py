"""Classes of faults that shipped in released transformers/accelerate versions: config drift,
TP splits inside a head, models that cannot run one step; and no false alarm on transformers'
own tensor parallelism for any family the suite has (packed Phi-3 weights included)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers as T

import smpcheck
from tests.models import _LLAMA_LIKE, FAMILIES, MIXTRAL, write_checkpoint
from tests.releases import needs_tp_plan

PHI3 = (T.Phi3Config, {**_LLAMA_LIKE, "pad_token_id": 0})
TP_FAMILIES = {
    "llama": FAMILIES["llama-gqa-untied"],
    "mistral": FAMILIES["mistral"],
    "qwen2": FAMILIES["qwen2"],
    "gpt-neox": FAMILIES["gpt-neox"],
    "mixtral": MIXTRAL,
    "phi3": PHI3,
}


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp-families")
    return {name: write_checkpoint(cls(**kwargs), root / name)
            for name, (cls, kwargs) in TP_FAMILIES.items()}


def statuses(report: smpcheck.Report) -> dict:
    return {r.name: (r.status.value, [f.sentence() for f in r.errors]) for r in report.results}


def transformers_tp(path: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    sharded = sum(hasattr(p, "placements") for p in model.parameters())
    return {"sharded": sharded, **statuses(smpcheck.verify(model, checkpoint=path))}


@needs_tp_plan
@pytest.mark.parametrize("family", sorted(TP_FAMILIES))
def test_transformers_own_tp_plan_passes_for_every_family(ranks, tp_checkpoints, family) -> None:
    out = ranks(transformers_tp, 2, args=(str(tp_checkpoints[family]),))[0]
    assert out.pop("sharded") > 0, "the plan sharded nothing: this test would prove nothing"
    failed = {name: v for name, v in out.items() if v[0] in ("fail", "error")}
    assert not failed, failed
    assert out["tp_shards"][0] == "pass" and out["forward"][0] == "pass", out


def packed_weight_row_shards(path: str) -> dict:
    """FSDP2 (no TP) shards Phi-3's packed qkv/gate_up rows anywhere: that is correct."""
    from reference_impl import DelayedParamIniter, apply_fsdp2, load_on_rank0

    model = load_on_rank0(path)
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    model = apply_fsdp2(model, device="cpu", initer=initer)
    return statuses(smpcheck.verify(model, checkpoint=path))


def test_fsdp2_row_shards_of_packed_weights_pass(ranks, tp_checkpoints) -> None:
    out = ranks(packed_weight_row_shards, 2, args=(str(tp_checkpoints["phi3"]),))[0]
    assert {n: s for n, (s, _) in out.items() if s in ("fail", "error")} == {}, out


# -- config drift ------------------------------------------------------------------------------
def drifted(path: str, field: str, value, on_rank: int | None) -> dict:
    """The model built from a config whose ``field`` was changed after reading config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if on_rank is None or dist.get_rank() == on_rank:
        target, _, attr = field.rpartition(".")
        holder = getattr(config, target) if target else config
        if isinstance(holder, dict):
            holder[attr] = value
        else:
            setattr(holder, attr, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=config)
    report = smpcheck.verify(model, checkpoint=path)
    return {r.name: (r.status.value, [(f.tensor, f.ranks) for f in r.errors])
            for r in report.results}


# Where the rotary base lives: transformers 5 nests it in rope_parameters, 4.x keeps rope_theta.
ROPE_THETA = ("rope_parameters.rope_theta" if hasattr(T.LlamaConfig(), "rope_parameters")
              else "rope_theta")


@pytest.fixture(scope="module")
def rope_checkpoint(tmp_path_factory):
    cls, kwargs = FAMILIES["llama-gqa-untied"]
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
            if "." in ROPE_THETA else {"rope_theta": 500000.0})
    config = cls(**kwargs, **rope)
    return write_checkpoint(config, tmp_path_factory.mktemp("rope") / "llama")


def test_config_drift_in_a_rotary_field_names_the_field_and_the_buffer(
        ranks, rope_checkpoint) -> None:
    out = ranks(drifted, 2, args=(str(rope_checkpoint), ROPE_THETA, 10000.0, None))[0]
    assert out["initialised"][0] == "pass", "recomputed from the same wrong config: blind"
    status, findings = out["config_parity"]
    assert status == "fail"
    assert (f"config.{ROPE_THETA}", [0, 1]) in findings
    assert ("model.rotary_emb.inv_freq", [0, 1]) in findings


def test_config_drift_in_a_non_rotary_field_is_named(ranks, checkpoints) -> None:
    out = ranks(drifted, 2, args=(str(checkpoints["mistral"]), "rms_norm_eps", 1e-2, None))[0]
    assert out["config_parity"] == ("fail", [("config.rms_norm_eps", [0, 1])])
    assert out["checkpoint_parity"][0] == "pass" and out["forward"][0] == "pass"


def test_a_config_that_differs_on_one_rank_is_named(ranks, checkpoints) -> None:
    out = ranks(drifted, 2, args=(str(checkpoints["qwen2"]), "rms_norm_eps", 1e-3, 1))[0]
    status, findings = out["config_parity"]
    assert status == "fail" and ("config.rms_norm_eps", [1]) in findings


def test_a_clean_load_has_no_config_difference(ranks, checkpoints) -> None:
    out = ranks(drifted, 2, args=(str(checkpoints["gpt-neox"]), "unused", 0, 99))[0]
    assert out["config_parity"] == ("pass", []), out


# -- TP that splits heads, models that cannot run ------------------------------------------
def tp_split_heads(path: str, with_dense: bool) -> dict:
    """TP degree 2 over a model with one KV head: k/v shards hold half a head each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path) if with_dense else None
    plan = {f"model.layers.*.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj",
                                                                           "v_proj")}
    plan["model.layers.*.self_attn.o_proj"] = RowwiseParallel()
    parallelize_module(model, init_device_mesh("cpu", (2,)), plan)
    report = smpcheck.verify(model, checkpoint=path, dense_model=dense)
    return {r.name: (r.status.value, [(f.tensor, f.problem) for f in r.errors])
            for r in report.results}


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory):
    cls, kwargs = FAMILIES["llama-gqa-untied"]
    config = cls(**{**kwargs, "num_key_value_heads": 1})
    return write_checkpoint(config, tmp_path_factory.mktemp("kv1") / "llama")


@pytest.mark.parametrize("with_dense", [False, True])
def test_tp_degree_above_the_kv_heads_is_named_with_its_arithmetic(
        ranks, one_kv_head, with_dense) -> None:
    out = ranks(tp_split_heads, 2, args=(str(one_kv_head), with_dense))[0]
    status, findings = out["tp_shards"]
    assert status == "fail"
    by_tensor = dict(findings)
    assert "model.layers.0.self_attn.k_proj.weight" in by_tensor
    assert "0.5 heads" in by_tensor["model.layers.0.self_attn.k_proj.weight"]
    assert "model.layers.0.self_attn.q_proj.weight" not in by_tensor  # 4 query heads split fine
    assert out["forward"][0] == "fail" and "cannot run" in out["forward"][1][0][1]
    if with_dense:  # a finding about the model, not an error of the check
        assert out["tp_numerics"][0] == "fail", out["tp_numerics"]
        assert "cannot run" in out["tp_numerics"][1][0][1]


def packed_split_as_one_block(path: str) -> dict:
    """Phi-3's packed q/k/v split as one column block without gathering (NeMo Automodel#1324's
    class): each rank's slice is what its placement says and every rank computes the same
    logits, silently wrong. Only a dense reference shows it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path)
    parallelize_module(model, init_device_mesh("cpu", (2,)),
                       {"model.layers.*.self_attn.qkv_proj": ColwiseParallel()})
    report = smpcheck.verify(model, checkpoint=path, dense_model=dense,
                             checks=["tp_shards", "forward"])
    return {r.name: (r.status.value, [(f.tensor, f.problem) for f in r.errors])
            for r in report.results}


def test_a_packed_weight_split_as_one_block_differs_from_the_dense_model(
        ranks, tp_checkpoints) -> None:
    out = ranks(packed_split_as_one_block, 2, args=(str(tp_checkpoints["phi3"]),))[0]
    assert out["tp_shards"][0] == "pass", "the shards are the slices their placement names"
    status, findings = out["forward"]
    assert status == "fail" and "differ from the dense model" in findings[0][1], out


def corrupt_head_output(path: str) -> dict:
    """A lm_head sharded by columns whose output is never gathered: logits are a shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    parallelize_module(model, init_device_mesh("cpu", (2,)), {"lm_head": ColwiseParallel()})
    return {r.name: (r.status.value, [(f.tensor, f.problem) for f in r.errors])
            for r in smpcheck.verify(model, checkpoint=path).results}


def test_logits_that_are_a_shard_are_named(ranks, checkpoints) -> None:
    out = ranks(corrupt_head_output, 2, args=(str(checkpoints["llama-gqa-untied"]),))[0]
    status, findings = out["forward"]
    assert status == "fail" and "last dimension" in findings[0][1], out["forward"]


def nan_on_one_rank_forward(path: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.model.norm.weight[3] = float("nan")
    report = smpcheck.verify(model, checks=["forward"])
    return {r.name: (r.status.value, [(f.tensor, f.ranks, f.problem) for f in r.errors])
            for r in report.results}


def test_forward_names_the_rank_whose_outputs_are_not_finite(ranks, checkpoints) -> None:
    status, findings = ranks(nan_on_one_rank_forward, 2,
                             args=(str(checkpoints["mistral"]),))[0]["forward"]
    assert status == "fail"
    assert any(ranks == [1] and "NaN" in problem for _, ranks, problem in findings), findings
