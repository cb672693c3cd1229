"""``smpcheck plan``: the prediction from headers alone (fast, in process, on tiny checkpoints
written with ``save_pretrained``), the size parser, the fit decision, the JSON shape, and the
CLI once end to end plus one bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as T

from smpcheck.memory import ModelSize
from smpcheck.memory.plan import (
    StrategyFacts,
    checkpoint_facts,
    device_bytes,
    model_for,
    node_memory_here,
    parse_bytes,
    plan,
    predict_rank,
)
from smpcheck.memory.plan_fit import FIT
from smpcheck.run.plan_cli import strategy_facts
from smpcheck.strategies import STRATEGIES
from tests.console import run_cli
from tests.models import write_checkpoint

GIB = 2**30
CALIBRATED = sorted(FIT["strategies"])


def _llama(path: Path, layers: int, hidden: int = 32) -> Path:
    config = T.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64)
    return write_checkpoint(config, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    return {"small": _llama(root / "small", 1), "large": _llama(root / "large", 6, 64)}


def _plan(path: Path, nproc: int = 4, **kwargs) -> dict:
    size, numel, itemsize = checkpoint_facts(path, torch.float32)
    return plan(size, numel, itemsize, strategy_facts(CALIBRATED, nproc * kwargs.get(
        "nnodes", 1)), nproc_per_node=nproc, **kwargs)


def _by_name(data: dict) -> dict[str, dict]:
    return {row["name"]: row for row in data["strategies"]}


def test_every_strategy_run_knows_is_planned_for() -> None:
    """A strategy without calibrated terms would make the plan fail, so every strategy smpcheck
    run knows has them (SageMaker's SMP through our SMP recipe's row)."""
    data = plan(ModelSize(GIB, GIB // 8, GIB // 4), GIB // 4, 4,
                strategy_facts(list(STRATEGIES), 8), nproc_per_node=8)
    assert [r["name"] for r in data["strategies"]] == list(STRATEGIES)


def test_sizes_come_from_headers_in_the_loaded_dtype(tiny) -> None:
    size32, numel, itemsize = checkpoint_facts(tiny["small"], torch.float32)
    size16, numel16, itemsize16 = checkpoint_facts(tiny["small"], torch.bfloat16)
    model = T.AutoModelForCausalLM.from_pretrained(tiny["small"])
    assert numel == numel16 == sum(p.numel() for p in model.parameters())
    assert (itemsize, itemsize16) == (4, 2)
    assert size32.total == 2 * size16.total == 4 * numel
    assert checkpoint_facts(tiny["small"])[2] == 4  # as stored (float32)


def test_predictions_grow_with_the_model(tiny) -> None:
    small, large = _by_name(_plan(tiny["small"])), _by_name(_plan(tiny["large"]))
    for name in CALIBRATED:
        assert large[name]["node_peak_bytes"] >= small[name]["node_peak_bytes"], name
        assert large[name]["device_total_bytes"] > small[name]["device_total_bytes"], name
    size = ModelSize(GIB, GIB // 16, GIB // 8)
    for name in CALIBRATED:  # and strictly, well above the fixed costs
        facts = strategy_facts([name], 4)[0]
        model = model_for(facts.memory_strategy, name)[1]
        twice = ModelSize(2 * GIB, GIB // 8, GIB // 4)
        assert (predict_rank(model, facts, twice, 1).peak_bytes
                > predict_rank(model, facts, size, 1).peak_bytes), name


def test_sharding_divides_the_device_state_and_zero2_keeps_parameters_whole() -> None:
    numel = 10**9
    fsdp = device_bytes(StrategyFacts("fsdp2", "fsdp2", 8), numel, 2)
    assert fsdp["params"] == fsdp["grads"] == 2 * numel // 8
    assert fsdp["optimizer"] == 12 * numel // 8  # two fp32 states + fp32 masters of bf16
    assert device_bytes(StrategyFacts("fsdp2", "fsdp2", 8), numel, 4)["optimizer"] == (
        8 * numel // 8)  # fp32 parameters are their own masters
    zero2 = device_bytes(StrategyFacts("deepspeed-zero2", "naive", 8, True), numel, 2)
    assert zero2["params"] == 2 * numel and zero2["grads"] == 2 * numel // 8
    one = device_bytes(StrategyFacts("fsdp2", "fsdp2", 1), numel, 2)
    assert one["total"] == 8 * fsdp["total"]


def test_more_ranks_split_the_sharded_strategies_only() -> None:
    size = ModelSize(8 * GIB, GIB // 4, GIB // 2)
    four = _by_name(plan(size, 2 * GIB, 4, strategy_facts(CALIBRATED, 4), nproc_per_node=4))
    # the same 4 ranks per node, 4 nodes: each rank's shard is a quarter of what it was
    many = _by_name(plan(size, 2 * GIB, 4, strategy_facts(CALIBRATED, 16), nproc_per_node=4,
                         nnodes=4))
    assert many["streaming"]["other_rank_peak_bytes"] < four["streaming"]["other_rank_peak_bytes"]
    assert many["fsdp2"]["device_params_bytes"] * 4 == four["fsdp2"]["device_params_bytes"]
    # naive loads the whole model on every rank whatever the world: only its shard shrinks
    def ratio(name: str) -> float:
        return many[name]["phases_other"]["init"] / four[name]["phases_other"]["init"]

    assert ratio("naive") > 0.75 and ratio("streaming") < 0.5
    assert many["streaming"]["node_peak_bytes"] < four["naive"]["node_peak_bytes"]


def test_the_fit_decision_and_the_recommendation() -> None:
    size = ModelSize(8 * GIB, GIB // 4, GIB // 2)
    names = ["naive", "fsdp2", "streaming"]
    roomy = plan(size, 2 * GIB, 4, strategy_facts(names, 8), nproc_per_node=8,
                 node_memory=10**15)
    rows = _by_name(roomy)
    assert all(r["fits"] for r in rows.values())
    assert roomy["recommended"] == min(rows, key=lambda n: rows[n]["node_peak_bytes"])
    assert roomy["recommended"] in roomy["recommendation"]
    # a node between the lowest and the highest need: only the lower ones fit
    needs = sorted(r["node_need_bytes"] for r in rows.values())
    middle = plan(size, 2 * GIB, 4, strategy_facts(names, 8), nproc_per_node=8,
                  node_memory=(needs[0] + needs[-1]) // 2)
    fits = {r["name"]: r["fits"] for r in middle["strategies"]}
    assert fits[middle["recommended"]] and not all(fits.values())
    assert all(r["fits"] == (r["node_need_bytes"] <= (needs[0] + needs[-1]) // 2)
               for r in middle["strategies"])
    tight = plan(size, 2 * GIB, 4, strategy_facts(names, 8), nproc_per_node=8, node_memory=1)
    assert tight["recommended"] is None and tight["recommendation"].startswith("No strategy")
    # one that cannot run here is recommended only when nothing that can run fits
    facts = [StrategyFacts("streaming", "streaming", 8, unavailable="not installed"),
             *strategy_facts(["naive"], 8)]
    assert plan(size, 2 * GIB, 4, facts, nproc_per_node=8,
                node_memory=10**15)["recommended"] == "naive"


@pytest.mark.parametrize("text, expected", [
    ("1000", 1000), ("512G", 512 * GIB), ("512GiB", 512 * GIB), ("64GB", 64 * 10**9),
    ("1.5TiB", int(1.5 * 2**40)), ("1.5T", int(1.5 * 2**40)), ("2 MiB", 2 * 2**20),
    ("100k", 100 * 1024), ("1e9", 10**9)])
def test_sizes_parse(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5G", "0", "12X", "5GG"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_node_memory_is_read_from_meminfo(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree: 1 kB\nMemAvailable:    8192 kB\n")
    assert node_memory_here(meminfo) == {"MemTotal": 16384 * 1024, "MemAvailable": 8192 * 1024}
    assert node_memory_here(tmp_path / "absent") == {}


def test_skipping_the_forward_phase_leaves_it_out(tiny) -> None:
    data = _plan(tiny["large"], skip=("forward",))
    assert all("forward" not in r["phases_rank0"] and r["peak_phase"] != "forward"
               for r in data["strategies"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("plan", *args, tmp=cwd)


def test_the_cli_prints_the_plan_as_json(tiny, tmp_path) -> None:
    out = _cli(str(tiny["large"]), "--nproc-per-node", "4", "--dtype", "float32",
               "--node-memory", "1T", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [r["name"] for r in data["strategies"]] == list(STRATEGIES)
    for row in data["strategies"]:
        assert {"name", "node_peak_bytes", "rank_peak_bytes"} <= set(row)
        assert row["node_peak_bytes"] >= row["rank_peak_bytes"] > 0
        assert row["fits"] is True
    assert data["node_memory_bytes"] == 2**40 and data["recommended"] in STRATEGIES
    human = _cli(str(tiny["large"]), "--nproc-per-node", "4", "--strategy", "fsdp2,naive",
                 cwd=tmp_path)
    assert human.returncode == 0, human.stderr
    assert "fsdp2" in human.stdout and "Use --strategy" in human.stdout


@pytest.mark.parametrize("args, words", [
    (["--nproc-per-node", "0"], "--nproc-per-node"),
    (["--strategy", "fsdp3"], "--strategy"),
    (["--skip", "tp_numerics"], "--skip"),
    (["--node-memory", "-3G"], "--node-memory"),
])
def test_bad_flags_are_usage_errors(tiny, args, words) -> None:
    from smpcheck.checkpoint.source import UsageError
    from smpcheck.cli import _parser
    from smpcheck.run.plan_cli import build

    with pytest.raises(UsageError, match=words):
        build(_parser().parse_args(["plan", str(tiny["small"]), *args]))


def test_bad_input_is_one_sentence_and_exit_2(tiny, tmp_path) -> None:
    for args, words in (([str(tiny["small"]), "--node-memory", "lots"], "--node-memory"),
                        ([str(tmp_path / "nowhere")], "nowhere")):
        out = _cli(*args, cwd=tmp_path)
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert out.stderr.startswith("smpcheck: ") and words in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
