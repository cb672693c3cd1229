"""Real fine-tuning setups judged: a new classification or token-classification head, LoRA on
attention and on the MLP, LoRA with ``modules_to_save``, on plain replicas, FSDP1 (the SMP
recipe) and FSDP2. Clean setups pass; each planted fault is named: a fresh head or adapter
shard that is garbage on one rank, garbage on every rank (rank 0's uninitialised tensor
broadcast), ``lora_B`` not zero at the start, a base weight under PEFT that differs from the
checkpoint. One process group per setup and layout runs every case (faults are restored)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import smpcheck
from smpcheck.shards.pieces import iter_pieces
from smpcheck.shards.tensors import clean_name
from tests.faults import while_planted
from tests.models import FAMILIES, write_checkpoint
from tests.test_finetune_recipe import SETUPS, build

LAYOUTS = ("replicas", "fsdp1", "fsdp2")
MIN_ELEMENTS = 64  # a shard this size shows garbage for certain (benchmarks/init_rules)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    cls, kwargs = FAMILIES["llama-gqa-untied"]
    return write_checkpoint(cls(**kwargs), tmp_path_factory.mktemp("ft") / "llama", seed=3)


def wrapped(path: str, setup: str, layout: str):
    from reference_impl import DelayedParamIniter, apply_fsdp1, apply_fsdp2

    rank = dist.get_rank()
    torch.manual_seed(0)  # replicas: every rank draws the same fresh head and adapters
    model = build(path, setup, rank=0 if layout == "replicas" else rank)
    if layout == "replicas":
        return model
    initer = DelayedParamIniter(model, device="cpu") if rank else None
    if layout == "fsdp1":
        return apply_fsdp1(model, device="cpu", initer=initer)
    return apply_fsdp2(model, device="cpu", initer=initer)


def verdicts(model, path: str) -> dict:
    report = smpcheck.verify(model, checkpoint=path)
    return {r.name: (r.status.value, sorted((f.tensor, tuple(f.ranks)) for f in r.errors))
            for r in report.results} | {"sources": report.expected.get("sources", {})}


def fresh_pieces(model, pattern: str) -> list:
    return [p for p in iter_pieces(model) if pattern in p.name and p.is_param
            and p.data.numel() >= MIN_ELEMENTS]


def with_planted(model, pieces: list, fill, path: str) -> dict:
    return while_planted(pieces, fill, lambda: verdicts(model, path))


def tiny(data: torch.Tensor) -> None:  # uninitialised memory: finite, tiny, the same everywhere
    data.copy_(torch.randn(data.shape, generator=torch.Generator().manual_seed(5)) * 1e-18)


def every_case(path: str, setup: str, layout: str) -> dict:
    model = wrapped(path, setup, layout)
    fresh = "lora_" if SETUPS[setup][2] else "score."
    rank = dist.get_rank()
    out = {"clean": verdicts(model, path)}
    mine = fresh_pieces(model, fresh)
    holds: list = [None] * dist.get_world_size()
    dist.all_gather_object(holds, bool(mine))
    bad = max((r for r, h in enumerate(holds) if h), default=None)  # rank 1 when it can
    out["one_rank"] = with_planted(model, mine if rank == bad else [], tiny, path)
    out["every_rank"] = with_planted(model, mine, tiny, path)
    if SETUPS[setup][2]:
        out["lora_b"] = with_planted(
            model, fresh_pieces(model, "lora_B"),
            lambda d: d.copy_(torch.randn(d.shape, generator=torch.Generator().manual_seed(6))
                              * 0.02), path)
        from smpcheck.shards.pieces import flat_full_shapes

        names = [*flat_full_shapes(model), *(n for n, _ in model.named_parameters())]
        base = sorted(clean_name(n) for n in names if ".base_layer.weight" in n)[0]
        out["base"] = with_planted(model, [p for p in iter_pieces(model) if p.name == base],
                                   lambda d: d.add_(0.01), path)
        out["base_tensor"] = base
    out["planted_on"] = (bad, sorted({p.name for p in mine}) if rank == bad else None)
    return out


def failed(verdict: dict) -> dict:
    return {n: v for n, v in verdict.items() if n != "sources" and v[0] in ("fail", "error")}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_finetuning_setups_pass_clean_and_name_planted_faults(
        ranks, causal_lm, setup, layout) -> None:
    results = ranks(every_case, 2, args=(str(causal_lm), setup, layout))
    out = results[0]
    bad = out["planted_on"][0]
    assert bad is not None, f"no rank holds a {MIN_ELEMENTS}-element piece of a fresh tensor"
    planted = results[bad]["planted_on"][1]
    assert not failed(out["clean"]), out["clean"]
    sources = out["clean"]["sources"]
    assert "fresh init" in {kind for kinds in sources.values() for kind in kinds}, sources
    status, findings = out["one_rank"]["fresh_init"]
    assert status == "fail" and {r for _, rs in findings for r in rs} == {bad}, findings
    assert {n for n, _ in findings} <= set(planted)
    status, findings = out["every_rank"]["fresh_init"]
    assert status == "fail" and bad in {r for _, rs in findings for r in rs}, findings
    if "lora_b" in out:
        status, findings = out["lora_b"]["fresh_init"]
        assert status == "fail" and all(".lora_B." in n for n, _ in findings), findings
        status, findings = out["base"]["checkpoint_parity"]
        assert status == "fail", out["base"]
        assert {n for n, _ in findings} == {out["base_tensor"]}, findings
