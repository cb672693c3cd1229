"""MoE experts fused on load (Mixtral, Qwen2-MoE under transformers 5) are compared exactly,
shard by shard, with the value transformers' own conversion ops build from the checkpoint:
clean setups pass on plain replicas, FSDP1, FSDP2 and (Mixtral) TP; one changed element of
one expert on every rank, and an expert shard swapped between ranks, are named."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import smpcheck
from smpcheck.shards.pieces import iter_pieces
from tests.models import MOE_FAMILIES, write_checkpoint
from tests.releases import needs_transformers_5

pytestmark = needs_transformers_5

EXPERTS = ".mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    return {name: write_checkpoint(cls(**kwargs), root / name)
            for name, (cls, kwargs) in MOE_FAMILIES.items()}


def build(path: str, layout: str):
    from reference_impl import (
        DelayedParamIniter,
        apply_fsdp1,
        apply_fsdp2,
        build_mesh,
        load_on_rank0,
        transform,
    )

    if layout == "replicas":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path)
    model = load_on_rank0(path)
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    if layout == "fsdp1":
        return apply_fsdp1(model, device="cpu", initer=initer)
    if layout == "fsdp2":
        return apply_fsdp2(model, device="cpu", initer=initer)
    mesh = build_mesh("cpu", 2)  # tp: attention sharded, experts replicated, FSDP2 over dp
    model = transform(model, device_mesh=mesh, device="cpu", load_state_dict_from_rank0=True)
    return apply_fsdp2(model, device="cpu", mesh=mesh["dp"], load_from_rank0=False)


def verdicts(model, path: str, checks=None) -> dict:
    report = smpcheck.verify(model, checkpoint=path, checks=checks)
    return {r.name: (r.status.value, sorted((f.tensor, tuple(f.ranks)) for f in r.errors))
            for r in report.results} | {"sources": report.expected.get("sources", {})}


def expert_piece(model):
    return next(p for p in iter_pieces(model) if p.name.endswith("layers.0" + EXPERTS))


def clean_then_faults(path: str, layout: str) -> dict:
    model = build(path, layout)
    out = {"clean": verdicts(model, path)}
    piece = expert_piece(model)
    saved = piece.data.clone()
    with torch.no_grad():  # one element of one expert, changed on every rank
        piece.data.view(-1)[min(7, piece.data.numel() - 1)] += 0.5
    out["one_element"] = verdicts(model, path, ["checkpoint_parity"])
    with torch.no_grad():
        piece.data.copy_(saved)
    if layout in ("fsdp1", "fsdp2") and dist.get_world_size() == 2:
        # an expert shard swapped between the two ranks (equal sizes: same element count)
        other: list = [None, None]
        dist.all_gather_object(other, saved.numpy().copy())
        mine, theirs = (torch.from_numpy(other[r]) for r in (dist.get_rank(),
                                                             1 - dist.get_rank()))
        if theirs.shape == mine.shape:
            with torch.no_grad():
                piece.data.copy_(theirs)
            out["swapped"] = verdicts(model, path, ["checkpoint_parity"])
    return out


@pytest.mark.parametrize("layout", ["replicas", "fsdp1", "fsdp2"])
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_fused_experts_are_compared_exactly(ranks, moe_checkpoints, family, layout) -> None:
    path = str(moe_checkpoints[family])
    out = ranks(clean_then_faults, 2, args=(path, layout))[0]
    clean = out["clean"]
    failed = {n: v for n, v in clean.items() if n != "sources" and v[0] in ("fail", "error")}
    assert not failed, failed
    assert clean["sources"]["model.layers.*.mlp.experts.gate_up_proj"] == ["fused"]
    status, findings = out["one_element"]["checkpoint_parity"]
    assert status == "fail"
    assert {name for name, _ in findings} == {"model.layers.0" + EXPERTS}
    if "swapped" in out:  # uneven shards (Qwen2-MoE's 5 experts) cannot be swapped
        status, findings = out["swapped"]["checkpoint_parity"]
        assert status == "fail" and {n for n, _ in findings} == {"model.layers.0" + EXPERTS}
        assert {r for _, ranks in findings for r in ranks} == {0, 1}, findings


def test_mixtral_under_tp_is_compared_exactly(ranks, moe_checkpoints) -> None:
    out = ranks(clean_then_faults, 4, args=(str(moe_checkpoints["mixtral"]), "tp"))[0]
    failed = {n: v for n, v in out["clean"].items()
              if n != "sources" and v[0] in ("fail", "error")}
    assert not failed, failed
    status, findings = out["one_element"]["checkpoint_parity"]
    assert status == "fail" and findings[0][0] == "model.layers.0" + EXPERTS
