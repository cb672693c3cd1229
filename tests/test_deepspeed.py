"""DeepSpeed ZeRO: the other delayed init, judged partition by partition on real gloo ranks.

ZeRO-3 builds the model inside ``deepspeed.zero.Init`` (``HfDeepSpeedConfig`` alive during
``from_pretrained``, as the Trainer does): every parameter is empty and ``ds_tensor`` holds this
rank's flat, padded partition. ZeRO-2 keeps parameters replicated. DeepSpeed's CPU accelerator
falls back to gloo here. Correct models pass every check; a fault in one rank's partition, or
in every rank's copy, fails naming the tensor and the ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import smpcheck
from smpcheck.shards.pieces import iter_pieces
from tests.faults import corrupt

pytest.importorskip("deepspeed")

TARGET = "model.layers.1.mlp.down_proj.weight"


def _engine(path: str, stage: int):
    """The model as ``deepspeed.initialize`` returns it, loaded the way users load it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import transformers as T
    from transformers.integrations import HfDeepSpeedConfig

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    keep = HfDeepSpeedConfig(config) if stage == 3 else None  # noqa: F841 - must stay alive
    model = T.AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _statuses(report: smpcheck.Report) -> dict:
    return {r.name: (r.status.value, [(f.tensor, f.ranks) for f in r.findings
                                      if f.severity == "error"], r.message)
            for r in report.results}


def verify_zero(path: str, stage: int, fault: str) -> dict:
    engine = _engine(path, stage)
    model = engine.module
    pieces = {p.name: p for p in iter_pieces(model)}
    held = pieces[TARGET]
    if fault == "one-rank" and dist.get_rank() == 1:
        corrupt(held.data, "epsilon")
    elif fault == "every-rank":
        corrupt(held.data, "epsilon")
    elif fault == "garbage" and dist.get_rank() == 1:
        corrupt(held.data, "garbage")
    elif fault == "behind-optimizer":  # weights loaded after the optimizer built its masters
        corrupt(held.data, "epsilon")
    out = _statuses(smpcheck.verify(model, checkpoint=path, optimizer=engine.optimizer))
    out["piece"] = (held.kind, held.flat_range, tuple(held.data.shape), held.full_shape)
    return out


@pytest.mark.parametrize("stage", [3, 2])
def test_correct_zero_models_pass(ranks, checkpoints, stage) -> None:
    out = ranks(verify_zero, 2, args=(str(checkpoints["llama-gqa-untied"]), stage, "none"))
    assert out[0]["initialised"] == out[1]["initialised"]
    report = out[0]
    for name in ("preflight", "config_parity", "initialised", "rank_parity",
                 "checkpoint_parity", "coverage", "masters", "forward"):
        assert report[name][0] == "pass", (name, report[name])
    if stage == 3:  # each rank holds half the flattened tensor, its padding excluded
        kinds = [o["piece"] for o in out]
        assert kinds[0][0] == "flat" and kinds[0][1] == (0, 1024) and kinds[1][1] == (1024, 2048)
        assert kinds[0][3] == (32, 64)
        assert "42 pieces compared" in report["checkpoint_parity"][2]


@pytest.mark.parametrize("stage", [3, 2])
def test_a_fault_in_one_ranks_partition_is_named(ranks, checkpoints, stage) -> None:
    out = ranks(verify_zero, 2, args=(str(checkpoints["llama-gqa-untied"]), stage, "one-rank"))
    assert out[0]["checkpoint_parity"] == out[1]["checkpoint_parity"]
    status, errors, _ = out[0]["checkpoint_parity"]
    assert (status, errors) == ("fail", [(TARGET, [1])])
    if stage == 2:  # a replica: rank parity names the rank too
        assert out[0]["rank_parity"][0] == "fail"


def test_a_fault_in_every_ranks_copy_is_named_on_every_rank(ranks, checkpoints) -> None:
    out = ranks(verify_zero, 2, args=(str(checkpoints["llama-gqa-untied"]), 2, "every-rank"))
    assert out[0]["checkpoint_parity"] == out[1]["checkpoint_parity"]  # fails on every rank
    status, errors, _ = out[0]["checkpoint_parity"]
    # Replicas share the reading (one compares, rank parity proves the others equal it).
    assert status == "fail" and [tensor for tensor, _ in errors] == [TARGET]
    assert out[0]["rank_parity"][0] == "pass"  # rank parity alone cannot see it


@pytest.mark.parametrize("stage", [3, 2])
def test_weights_changed_behind_the_optimizer_fail_its_masters(ranks, checkpoints,
                                                                stage) -> None:
    out = ranks(verify_zero, 2, args=(str(checkpoints["llama-gqa-untied"]), stage,
                                      "behind-optimizer"))
    status, errors, _ = out[0]["masters"]
    assert status == "fail" and {tensor for tensor, _ in errors} == {TARGET}, out[0]["masters"]


def test_garbage_in_a_zero3_partition_fails_initialised(ranks, checkpoints) -> None:
    out = ranks(verify_zero, 2, args=(str(checkpoints["llama-gqa-untied"]), 3, "garbage"))
    status, errors, _ = out[0]["initialised"]
    assert status == "fail" and errors == [(TARGET, [1])]


def test_the_deepspeed_strategies_are_measured_beside_ours_in_compare(tmp_path) -> None:
    """``smpcheck run --strategy deepspeed-zero3``, the path users take, as a row of
    ``smpcheck compare``: every check passes, the memory bound and the optimizer's masters
    included."""
    import json

    from tests.console import run_cli

    strategies = ["deepspeed-zero3"]  # zero2 runs the same path with replicated parameters
    out = run_cli("compare", "--strategies", ",".join(strategies), tmp=tmp_path, timeout=600,
                  env={"DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["strategy"]: r for r in json.loads(
        (tmp_path / "reports" / "compare-demo.json").read_text())["rows"]}
    assert set(rows) == set(strategies) and all(r["ok"] for r in rows.values()), rows
    report = json.loads((tmp_path / "reports" / "smpcheck-deepspeed-zero3-tp1.json").read_text())
    statuses = {r["name"]: r["status"] for r in report["results"]}
    for name in ("initialised", "checkpoint_parity", "coverage", "masters", "forward",
                 "memory"):
        assert statuses[name] == "pass", statuses
