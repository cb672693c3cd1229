"""Fast in-process tests of the pure parts, with a fake context (no process group): how the
framework turns gathered summaries into one verdict, how findings merge across ranks,
preflight's differences, memory bounds, config field rules, PEFT's names, checkpoint renames
and the comparison's summaries. The real-group tests show the same logic end to end."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from smpcheck.checks.base import (
    CheckContext,
    LocalFindings,
    RankFailed,
    Skip,
    judge_local,
    merge_findings,
    run_checks,
)
from smpcheck.checks.config_parity import classify, differences, flatten
from smpcheck.checks.preflight import _differences
from smpcheck.memory import ModelSize, memory_bound
from smpcheck.report.compare import compare, summarize
from smpcheck.report.model import CheckResult, Finding, Report, Status

MIB = 2**20


@dataclass
class FakeContext(CheckContext):
    """A context for ``world`` ranks whose gathers return canned entries for the others:
    what every other rank would have sent, so one process plays rank ``me``."""

    others: dict = field(default_factory=dict)  # check name -> {rank: summary}
    world: int = 2
    me: int = 0
    gathers: int = 0

    @property
    def rank(self) -> int:
        return self.me

    @property
    def world_size(self) -> int:
        return self.world

    def all_gather(self, obj):
        self.gathers += 1
        mine, seconds, host = obj if len(obj) == 3 else (*obj, "host")
        out = []
        for rank in range(self.world):
            if rank == self.me:
                out.append(obj)
                continue
            theirs = {name: self.others.get(name, {}).get(rank, value)
                      for name, value in mine.items()}
            out.append((theirs, seconds, f"host-{rank}")[:len(obj)])
        return out


class Counts:
    """A check whose summary is a number; it fails when any rank's number is odd."""

    name = "counts"

    def __init__(self, value=0, raises=False) -> None:
        self.value, self.raises = value, raises

    def summarize(self, ctx):
        if self.raises:
            raise KeyError("boom")
        return self.value

    def judge(self, ctx, summaries):
        odd = [r for r, s in enumerate(summaries) if isinstance(s, int) and s % 2]
        findings = [Finding("t", odd, "odd")] if odd else []
        return CheckResult(self.name, Status.FAIL if odd else Status.PASS, "judged", findings)


class Forward:
    """A collective check: prepare may skip; collective returns the rank."""

    name = "forward"

    def __init__(self, skip=False) -> None:
        self.skip, self.ran = skip, False

    def prepare(self, ctx):
        return Skip("nothing to run") if self.skip else "input"

    def collective(self, ctx, prepared):
        self.ran = True
        return LocalFindings([], f"ran on {ctx.rank}")

    def judge(self, ctx, summaries):
        return judge_local(self.name, summaries)


def fake(**others) -> FakeContext:
    return FakeContext(torch.nn.Linear(2, 2), others=others)


def test_one_gather_for_every_check_and_the_same_verdict_from_any_rank() -> None:
    ctx = fake(counts={1: 3})
    run = run_checks(ctx, [Counts(2)])
    assert ctx.gathers == 1
    assert run.results[0].status == Status.FAIL and run.results[0].findings[0].ranks == [1]
    assert run.hosts == [socket.gethostname(), "host-1"]


def test_a_rank_that_raised_is_an_error_naming_it_and_keeps_its_traceback() -> None:
    ctx = fake(counts={1: RankFailed(1, "builtins.KeyError: 'boom'", "Traceback ...")})
    result = run_checks(ctx, [Counts(4)]).results[0]
    assert result.status == Status.ERROR
    assert result.message == "rank 1: the check itself raised builtins.KeyError: 'boom'"
    assert result.traceback == "Traceback ..."


def test_the_failing_rank_itself_sends_a_rank_failed_and_joins_the_gather() -> None:
    ctx = fake(counts={1: 2})
    result = run_checks(ctx, [Counts(raises=True)]).results[0]
    assert ctx.gathers == 1 and result.status == Status.ERROR
    assert result.message == "rank 0: the check itself raised KeyError: 'boom'"


def test_skips_everywhere_are_a_skip_and_a_skip_on_one_rank_is_judged() -> None:
    assert run_checks(fake(counts={1: Skip("x")}), [Counts()]).results[0].status == Status.PASS
    everywhere = fake(counts={1: Skip("no checkpoint")})
    check = Counts()
    check.summarize = lambda ctx: Skip("no checkpoint")
    assert run_checks(everywhere, [check]).results[0].message == "no checkpoint"


def test_a_collective_runs_only_when_every_rank_is_ready() -> None:
    ready = Forward()
    ctx = fake()
    run = run_checks(ctx, [ready])
    assert ready.ran and ctx.gathers == 2 and run.results[0].status == Status.PASS
    not_everywhere = Forward()
    ctx = fake(forward={1: Skip("rank 1 has no input")})
    run = run_checks(ctx, [not_everywhere])
    assert not not_everywhere.ran and ctx.gathers == 1
    assert run.results[0].status == Status.SKIP and "rank 1 has no input" in run.results[
        0].message
    failed = Forward()
    ctx = fake(forward={1: RankFailed(1, "ValueError: x", "tb")})
    result = run_checks(ctx, [failed]).results[0]
    assert not failed.ran and result.status == Status.ERROR and result.message.startswith(
        "rank 1:")


def test_findings_merge_across_ranks_and_counts_name_the_rank_when_they_differ() -> None:
    merged = merge_findings([[Finding("w", [0], "bad")], [Finding("w", [1], "bad")],
                             [Finding("w", [2], "other")]])
    assert [(f.problem, f.ranks) for f in merged] == [("bad", [0, 1]), ("other", [2])]
    result = judge_local("c", [LocalFindings([], "3 pieces"), LocalFindings([], "2 pieces")])
    assert result.status == Status.PASS and result.message == "rank 0: 3 pieces: all correct"


def test_status_order() -> None:
    assert Status.worst([Status.PASS, Status.SKIP]) == Status.PASS
    assert Status.worst([Status.FAIL, Status.ERROR, Status.PASS]) == Status.ERROR
    assert Status.worst([]) == Status.SKIP


def test_preflight_names_each_kind_of_difference() -> None:
    base = {"tensors": {"a": ["param", [2, 2], "float32", True, []],
                        "b": ["param", [2], "float32", True, []]},
            "ties": [["a", "c"]], "devices": ["cpu"]}
    other = {"tensors": {"a": ["param", [2, 2], "bfloat16", True, []],
                         "d": ["param", [1], "float32", True, []]},
             "ties": [], "devices": ["cuda"]}
    problems = {(t, p) for t, p, _, _ in _differences(base, other)}
    assert problems == {("b", "missing on this rank"), ("d", "exists only on this rank"),
                        ("a", "dtype differs"), ("a = c", "tied on rank 0, not tied here"),
                        ("(model)", "device types differ")}


@pytest.mark.parametrize(("strategy", "rank", "share"), [
    ("naive", 1, 1.0 + 1 / 4), ("fsdp2", 0, 1.0 + 1 / 4), ("fsdp2", 1, 1 / 4 + 0.1),
    ("streaming", 0, 1 / 4 + 0.2), ("streaming", 3, 1 / 4 + 0.1),
    ("smp", 2, 1 / 4 + 3 * 0.2)])
def test_memory_bounds_follow_the_share_each_strategy_makes_a_rank_hold(
        strategy, rank, share) -> None:
    size = ModelSize(total=1000 * MIB, largest_tensor=100 * MIB, largest_unit=200 * MIB)
    bound = memory_bound(rank=rank, baseline=300 * MIB, size=size, strategy=strategy,
                         world_size=4, slack=0)
    assert bound.share == pytest.approx(share)
    assert bound.limit == int(300 * MIB + 1.5 * share * 1000 * MIB)
    assert strategy in bound.derivation


def test_memory_bound_refuses_an_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="no memory bound"):
        memory_bound(rank=0, baseline=0, size=ModelSize(1, 1, 1), strategy="?", world_size=1)


def test_config_fields_flatten_and_are_classified_by_what_they_steer() -> None:
    flat = flatten({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"},
                    "hidden_size": 8, "id2label": {"0": "a"}})
    assert flat == {"rope_parameters.rope_theta": 1e4, "rope_parameters.rope_type": "default",
                    "hidden_size": 8, "id2label.0": "a"}
    generic = {"id2label", "dtype", "_name_or_path", "transformers_version"}
    assert classify("rope_parameters.rope_theta", generic) == "error"
    assert classify("rms_norm_eps", generic) == "error"
    assert classify("id2label.0", generic) == "warning"
    for soft in ("attention_dropout", "pad_token_id", "initializer_range", "use_cache"):
        assert classify(soft, generic) == "warning", soft
    assert classify("transformers_version", generic) is None
    assert classify("_attn_implementation", generic) is None
    assert differences({"a": 1, "b": 2}, {"a": 1, "c": 3}) == [("b", 2, "(absent)"),
                                                              ("c", "(absent)", 3)]


def test_peft_names_map_back_to_the_base_model() -> None:
    from smpcheck.expect.peft_names import ADAPTER, BASE, ORIGINAL, SAVED_COPY, PeftView

    view = PeftView(torch.nn.Linear(1, 1), "base_model.model.", ("lora_A", "lora_B"),
                    ("default",))
    p = "base_model.model."
    assert view.base_name(p + "model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight", BASE)
    assert view.base_name(p + "model.layers.0.self_attn.q_proj.lora_A.default.weight") == (
        p + "model.layers.0.self_attn.q_proj.lora_A.weight", ADAPTER)
    assert view.base_name(p + "score.modules_to_save.default.weight") == ("score.weight",
                                                                         SAVED_COPY)
    assert view.base_name(p + "score.original_module.weight") == ("score.weight", ORIGINAL)
    assert view.base_name(p + "model.norm.weight") == ("model.norm.weight", BASE)
    plain = PeftView(torch.nn.Linear(1, 1), "", (), ())
    assert plain.base_name("model.norm.weight") == ("model.norm.weight", BASE)


def test_checkpoint_keys_are_found_through_the_models_own_renames(tmp_path: Path) -> None:
    import transformers as T

    from smpcheck.checkpoint import Checkpoint

    config = T.GPTNeoXConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                             num_hidden_layers=1, num_attention_heads=2)
    with torch.device("meta"):
        model = T.GPTNeoXForCausalLM(config)
    save_file({"embed_out.weight": torch.zeros(16, 8),
               "gpt_neox.embed_in.weight": torch.ones(16, 8)}, str(tmp_path / "x.safetensors"))
    ckpt = Checkpoint(tmp_path / "x.safetensors", model)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert ckpt.key_for(f"{head}.weight") == "embed_out.weight"  # lm_head from transformers 5
    assert ckpt.key_for("embed_in.weight", "gpt_neox.") == "gpt_neox.embed_in.weight"
    assert ckpt.read("embed_out.weight", ((2, 4), (0, 8))).shape == (2, 8)
    assert ckpt.bytes_read == 2 * 8 * 4


def record(rank: int, baseline: int, peaks: dict[str, int]) -> dict:
    phases, t = [], 0.0
    for name, peak in peaks.items():
        phases.append({"name": name, "start": t, "end": t + 1.0, "peak_anon": peak})
        t += 1.0
    return {"rank": rank, "baseline_anon": baseline, "phases": phases}


def test_comparison_rows_count_the_strategy_not_smpchecks_own_phase() -> None:
    def report(peaks0: dict, peaks1: dict) -> Report:
        return Report([CheckResult("x", Status.PASS, "")], {"model_bytes": 100 * MIB},
                      {"ranks": [record(0, 10 * MIB, peaks0), record(1, 10 * MIB, peaks1)]})

    naive = report({"load": 210 * MIB, "check": 900 * MIB}, {"load": 210 * MIB})
    ours = report({"load": 60 * MIB, "wrap": 70 * MIB}, {"load": 40 * MIB})
    row = summarize("streaming", ours)
    assert row["node_total"] == 90 * MIB and row["rank0_x_model"] == pytest.approx(0.6)
    assert row["ready_s"] == pytest.approx(2.0)
    rows = {r["strategy"]: r for r in compare({"naive": naive, "streaming": ours})["rows"]}
    assert rows["naive"]["node_total"] == 400 * MIB  # its check phase is not counted
    assert rows["streaming"]["node_total_x_naive"] == pytest.approx(90 / 400)


# -- rank parity: who is blamed when replicas disagree -----------------------------------------
def test_a_replica_that_equals_the_file_settles_who_is_wrong_even_against_rank_0() -> None:
    from smpcheck.checks.rank_parity import disagreement

    members = [(0, "whole tensor", "bad", None), (1, "whole tensor", "good", True)]
    assert disagreement("w", members).ranks == [0]
    members = [(0, "whole tensor", "bad", False), (1, "whole tensor", "good", None),
               (2, "whole tensor", "bad", None)]
    assert disagreement("w", members).ranks == [0, 2]


def test_without_a_file_verdict_the_majority_decides_and_a_tie_names_every_rank() -> None:
    from smpcheck.checks.rank_parity import disagreement

    majority = [(r, "whole tensor", "bad" if r == 0 else "good", None) for r in range(3)]
    assert disagreement("w", majority).ranks == [0]
    tie = [(0, "whole tensor", "a", None), (1, "whole tensor", "b", None)]
    finding = disagreement("w", tie)
    assert finding.ranks == [0, 1] and "nothing tells which is right" in finding.problem
