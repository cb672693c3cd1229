"""Fresh-init rules: found by replay, judged per shard; correct inits pass, garbage fails."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from smpcheck.expect.fresh.init_judge import judge
from smpcheck.expect.fresh.init_replay import (
    fresh_init_rules,
    hf_init,
    mark_unknown,
    meta_twin,
    replay_init,
)
from smpcheck.expect.fresh.init_rules import InitRule
from smpcheck.expect.fresh.init_stats import merge_stats, shard_stats
from smpcheck.run.compat import transformers_version
from tests.init_garbage import (
    DTYPES,
    FAMILIES,
    LAYOUTS,
    correct,
    garbage,
    garbage_kinds,
    pieces,
    rule_from,
)
from tests.models import _LLAMA_LIKE
from tests.releases import LLAMA_NORM_INIT

HEAD = InitRule.normal(0, 0.02, source="LlamaForSequenceClassification._init_weights")
KAIMING = InitRule.uniform(-0.125, 0.125, via="kaiming_uniform_(a=2.24)")  # lora_A, fan-in 64
ZEROS = InitRule.constant(0)
RULES = [
    HEAD,
    InitRule.normal(0, 0.25),  # LoRA "gaussian", r=4
    KAIMING,
    InitRule.uniform(0, 2),
    InitRule.trunc_normal(0, 0.02, -2, 2),
    InitRule.trunc_normal(0, 1, -1.5, 1.5),
    InitRule.trunc_normal(0, 1, -0.2, 0.2),  # narrow: drawn by inverting the CDF
    InitRule.trunc_normal(0, 0.02, 0.02, 0.06),  # a tail window
    ZEROS,
    InitRule.constant(1),
]
SIZES = (1, 2, 3, 7, 64, 1000, 10_000, 1_000_000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded ops: with xdist workers sharing two cores, OpenMP's barriers cost more
    than the million-element reductions they split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES, ids=InitRule.distribution)
def test_correct_init_passes_at_every_size(rule: InitRule, dtype: torch.dtype) -> None:
    for seed, n in enumerate(SIZES):
        for via_float32 in (False, True):
            values = correct(rule, (n,), dtype, gen(seed), via_float32)
            ok, sentence = judge(rule, shard_stats(values))
            assert ok, (n, via_float32, sentence)
            assert rule.distribution() in sentence


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES, ids=InitRule.distribution)
def test_every_garbage_kind_fails(rule: InitRule, dtype: torch.dtype) -> None:
    for seed, kind in enumerate(garbage_kinds(rule, dtype)):
        values = garbage(rule, kind, 4096, dtype, gen(seed))
        if rule.kind == "constant" and bool((values == rule.value).all()):
            continue  # float16 rounds the tiny values to exactly the zeros the rule sets
        ok, sentence = judge(rule, shard_stats(values))
        assert not ok, (kind, sentence)
        assert rule.describe() in sentence, sentence


@pytest.mark.parametrize(("values", "rule", "words"), [
    (torch.randn(1000, generator=gen()) * 1.3e-18, HEAD, "std 1.34e-18, expected 0.02 "
     "(normal(0, 0.02) from LlamaForSequenceClassification._init_weights): uninitialised memory?"),
    (torch.zeros(64), HEAD, "all zeros: never initialised"),
    (torch.full((64,), 6.9e-18), HEAD, "all 64 values equal 6.9e-18, expected a random "
     "spread (normal(0, 0.02) from LlamaForSequenceClassification._init_weights): "
     "uninitialised memory?"),
    (torch.full((64,), 0.01), HEAD, "all 64 values equal 0.01"),
    (torch.empty(4096).uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5), HEAD, "a uniform init"),
    (torch.randn(1000, generator=gen()), HEAD, "expected 0.02 (normal(0, 0.02) from "
     "LlamaForSequenceClassification._init_weights): another rule's scale?"),
    (torch.randn(1000) * 0.125 / 3**0.5, KAIMING, "expected none below"),
    (torch.empty(64).uniform_(-0.125, 0.125), ZEROS, "expected all 0 (constant(0))"),
    (torch.tensor([0.01, math.nan]), HEAD, "1 of 2 values are NaN or Inf"),
])
def test_sentences_say_what_was_expected_and_seen(values, rule, words) -> None:
    ok, sentence = judge(rule, shard_stats(values))
    assert not ok and words in sentence, sentence


def test_small_pieces_pass_but_say_they_carry_little_evidence() -> None:
    ok, sentence = judge(HEAD, shard_stats(torch.tensor([6.9e-18])))
    assert ok and "too few" in sentence, sentence
    ok, sentence = judge(HEAD, shard_stats(torch.tensor([0.5])))  # 25 std out: gross
    assert not ok and sentence.startswith("std 0.5, expected 0.02"), sentence
    assert judge(HEAD, shard_stats(torch.empty(0)))[0]
    coarse = InitRule.normal(1, 0.002)  # bfloat16 rounds near 1 by more than its spread
    ok, sentence = judge(coarse, shard_stats(correct(coarse, (1000,), torch.bfloat16, gen())))
    assert ok and "rounding" in sentence, sentence


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_far_tail_truncations_torch_draws_imprecisely_are_judged_by_their_bounds(dtype) -> None:
    rule = InitRule.trunc_normal(0, 1, 1, 100)  # torch's erfinv strays to 30 stds and more
    ok, sentence = judge(rule, shard_stats(correct(rule, (5000,), dtype, gen())))
    assert ok and "only its bounds are judged" in sentence, sentence
    ok, sentence = judge(rule, shard_stats(torch.zeros(100, dtype=dtype)))
    assert not ok and "none below 1" in sentence, sentence


def test_zeroed_rows_are_allowed_and_no_more() -> None:
    rule = InitRule.normal(0, 0.02, zeroed=32)  # an embedding's padding row
    values = correct(rule, (64, 32), torch.float32, gen())
    assert judge(rule, shard_stats(values))[0]
    assert judge(rule, shard_stats(values[:1]))[0]  # the row shard that is the padding row
    values[1:8].zero_()
    ok, sentence = judge(rule, shard_stats(values))
    assert not ok and "exactly 0" in sentence, sentence


def test_unknown_rules_check_finiteness_only() -> None:
    rule = InitRule.unknown("init_lora_weights='pissa' derives the adapter from the base weight")
    assert judge(rule, shard_stats(torch.randn(10) * 1e6))[0]
    ok, sentence = judge(rule, shard_stats(torch.tensor([1.0, math.inf])))
    assert not ok and "NaN or Inf" in sentence


def test_stats_of_chunks_and_pieces_combine_exactly() -> None:
    values = torch.randn(10_001, generator=gen(), dtype=torch.float64) * 0.3 + 0.7
    values[5] = 0.0
    values[7] = math.nan
    whole = shard_stats(values, chunk_elements=1000)
    merged = merge_stats(shard_stats(p) for p in values.tensor_split(7))
    finite = values[torch.isfinite(values)]
    dev = finite - finite.mean()
    expected = dict(count=10_001, nonfinite=1, zeros=1, mean=finite.mean().item(),
                    m2=(dev**2).sum().item(), m3=(dev**3).sum().item(), m4=(dev**4).sum().item(),
                    min=finite.min().item(), max=finite.max().item())
    for stats in (whole, merged):
        for field, value in expected.items():
            assert getattr(stats, field) == pytest.approx(value, rel=1e-9, abs=1e-9), field
    assert pickle.loads(pickle.dumps(whole)) == whole
    assert whole.kurtosis == pytest.approx(len(finite) * expected["m4"] / expected["m2"] ** 2 - 3)


@st.composite
def sharded_inits(draw):
    family = draw(st.sampled_from(FAMILIES))
    rule = rule_from(family, draw(st.floats(1e-3, 1.0)),
                     draw(st.sampled_from((0.0, 0.0, 1.0, -0.5))), draw(st.floats(0.1, 100.0)),
                     draw(st.sampled_from((1.0, 0.0, 0.001, 0.5))))
    rows, cols = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    if family != "constant" and draw(st.booleans()):
        rule = rule.with_(zeroed=draw(st.integers(1, cols)))
    return (rule, (rows, cols), draw(st.sampled_from(DTYPES)), draw(st.booleans()),
            draw(st.sampled_from(LAYOUTS)), draw(st.integers(1, 16)), draw(st.integers(0, 2**31)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sharded_inits())
def test_hypothesis_correct_inits_never_fail_on_any_shard(case) -> None:
    rule, shape, dtype, via_float32, layout, count, seed = case
    full = correct(rule, shape, dtype, gen(seed), via_float32)
    stats = [shard_stats(p) for p in pieces(full, layout, count) if p.numel()]
    for s in [*stats, merge_stats(stats)]:
        ok, sentence = judge(rule, s)
        assert ok, sentence


# --- replay ---------------------------------------------------------------------------------

def tiny_config(**overrides) -> T.LlamaConfig:
    return T.LlamaConfig(**{**_LLAMA_LIKE, "num_hidden_layers": 1, **overrides})


def test_replay_reads_a_fresh_heads_rule_and_judges_the_real_head(checkpoints) -> None:
    path = checkpoints["llama-gqa-untied"]
    model = T.LlamaForSequenceClassification.from_pretrained(path, num_labels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rules = replay_init(model, hf_init)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "touched"
    rule = rules["score.weight"]
    assert (rule.kind, rule.mean, rule.std) == ("normal", 0.0, model.config.initializer_range)
    assert rule.describe() == "normal(0, 0.02) from LlamaForSequenceClassification._init_weights"
    norm = rules["model.norm.weight"]
    if transformers_version() >= LLAMA_NORM_INIT:
        assert norm == InitRule.constant(1, source="LlamaModel._init_weights")
    else:  # the norm keeps its construction value: no init rule to judge it by
        assert norm.kind == "unknown", norm
    assert rules["model.rotary_emb.inv_freq"].kind == "unknown"
    for shard in model.score.weight.detach().chunk(3, dim=0):  # row shards of a real head
        assert judge(rule, shard_stats(shard))[0]
    with torch.no_grad():
        model.score.weight[1:].fill_(6.9e-18)
    ok, sentence = judge(rule, shard_stats(model.score.weight.detach()[1:]))
    assert not ok and "uninitialised memory?" in sentence, sentence


def test_replay_token_classification_head_has_zero_bias() -> None:
    model = T.LlamaForTokenClassification(tiny_config(num_labels=5))
    rules = fresh_init_rules(model)
    assert rules["score.weight"].distribution() == "normal(0, 0.02)"
    assert rules["score.bias"].distribution() == "constant(0)"
    assert judge(rules["score.bias"], shard_stats(model.score.bias))[0]


def test_replay_keeps_padding_rows_and_ties() -> None:
    model = T.LlamaForCausalLM(tiny_config(pad_token_id=0, tie_word_embeddings=True))
    rules = fresh_init_rules(model)
    rule = rules["model.embed_tokens.weight"]
    assert rule.zeroed == model.config.hidden_size and rules["lm_head.weight"] == rule
    assert judge(rule, shard_stats(model.model.embed_tokens.weight.detach()))[0]


def lora_model(init_lora_weights, **config):
    from peft import LoraConfig, get_peft_model

    model = T.LlamaForSequenceClassification(tiny_config(num_labels=3))
    return get_peft_model(model, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="SEQ_CLS",
        init_lora_weights=init_lora_weights, **config))


def lora_names(rules: dict, name: str) -> list[str]:
    return [k for k in rules if f".{name}.default.weight" in k]


def test_replay_lora_default_is_kaiming_on_real_fan_in_and_zeros() -> None:
    model = lora_model(True)
    rules = fresh_init_rules(model)
    params = dict(model.named_parameters())
    for name in lora_names(rules, "lora_A"):
        fan_in = params[name].shape[1]
        rule = rules[name]
        assert rule.kind == "uniform" and rule.via.startswith("kaiming_uniform_(a=2.24")
        assert rule.high == pytest.approx(1 / math.sqrt(fan_in)) and rule.low == -rule.high
        assert rule.source == "LoraLayer.reset_lora_parameters"
        assert judge(rule, shard_stats(params[name]))[0]
    assert {64, 32} <= {params[n].shape[1] for n in lora_names(rules, "lora_A")}  # down_proj
    for name in lora_names(rules, "lora_B"):
        assert rules[name].distribution() == "constant(0)"
        assert judge(rules[name], shard_stats(params[name]))[0]
        ok, sentence = judge(rules[name], shard_stats(params[name].detach() + 1e-3))
        assert not ok and "expected all 0" in sentence
    copies = [k for k in rules if "modules_to_save.default" in k]
    assert copies and all(rules[k].distribution() == "normal(0, 0.02)" for k in copies)
    assert all(judge(rules[k], shard_stats(params[k]))[0] for k in copies)


def test_replay_lora_gaussian_and_data_dependent_inits() -> None:
    rules = fresh_init_rules(lora_model("gaussian"))
    assert {rules[n].distribution() for n in lora_names(rules, "lora_A")} == {"normal(0, 0.25)"}
    for how in ("pissa", "olora"):
        rules = fresh_init_rules(lora_model(how))
        adapters = lora_names(rules, "lora_A") + lora_names(rules, "lora_B")
        assert adapters and all(rules[n].kind == "unknown" and how in rules[n].reason
                                for n in adapters)
    from peft import IA3Config, get_peft_model

    ia3 = get_peft_model(T.LlamaForCausalLM(tiny_config()), IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    rules = {k: v for k, v in fresh_init_rules(ia3).items() if ".ia3_l." in k}
    assert rules and all(v.reason == "PEFT's ia3.Linear init is not replayed"
                         for v in rules.values())


def test_replay_names_trunc_normal_and_orthogonal_and_marks_rewrites_unknown() -> None:
    module = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8), "c": nn.Linear(8, 8)})

    def init(twin):
        nn.init.trunc_normal_(twin.a.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.orthogonal_(twin.b.weight)
        nn.init.normal_(twin.c.weight)
        twin.c.weight.mul_(2)
        mark_unknown(twin.a.bias, "computed from data")

    rules = replay_init(module, ("custom", init))
    assert rules["a.weight"] == InitRule.trunc_normal(
        0, 0.02, -0.04, 0.04, source="custom", via="trunc_normal_(std=0.02, a=-0.04, b=0.04)")
    assert rules["b.weight"].kind == "unknown" and "orthogonal_" in rules["b.weight"].reason
    assert rules["c.weight"].kind == "unknown" and "mul_" in rules["c.weight"].reason
    assert rules["a.bias"].reason == "computed from data"
    assert rules["b.bias"].reason == "no replayed init wrote it"


def test_meta_twin_uses_full_shapes_and_holds_no_memory() -> None:
    local = nn.Linear(8, 4)  # a rank's column shard of a Linear(64, 4)
    twin = meta_twin(local, shapes={"weight": (4, 64)})
    assert twin.weight.is_meta and twin.weight.shape == (4, 64) and twin is not local
    rules = replay_init(local, ("Linear.reset_parameters", lambda m: m.reset_parameters()),
                        shapes={"weight": (4, 64)})
    assert rules["weight"].high == pytest.approx(1 / 8)
    assert rules["weight"].describe() == (
        "uniform(-0.125, 0.125) by kaiming_uniform_(a=2.24) from Linear.reset_parameters")
    assert not local.weight.is_meta


# --- on real process groups: each rank judges the pieces it holds -------------------------

def judge_fresh_pieces(path: str, layout: str, bad_rank: int | None) -> dict[str, tuple]:
    """Rank function: load a causal-LM checkpoint into a classification model (a fresh
    ``score`` head, identical on every rank by seed), wrap it, plant tiny garbage in this
    rank's piece of ``score.weight`` on ``bad_rank``, judge every piece this rank holds."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    from smpcheck.shards.pieces import flat_full_shapes, iter_pieces

    torch.manual_seed(0)
    model = T.LlamaForSequenceClassification.from_pretrained(path, num_labels=3)
    if layout == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=False)
    shapes = {name: shape for name, (shape, _) in flat_full_shapes(model).items()}
    rules = fresh_init_rules(model, shapes=shapes)
    pieces_held = {p.name: p for p in iter_pieces(model)}
    if dist.get_rank() == bad_rank:
        with torch.no_grad():
            pieces_held["score.weight"].data.fill_(6.9e-18)
    return {name: (*judge(rules[name], shard_stats(p.data)), p.data.numel())
            for name, p in pieces_held.items() if name == "score.weight"}


@pytest.mark.parametrize("layout", ["fsdp2", "fsdp1-flat"])
def test_each_rank_judges_its_shard_of_a_fresh_head(ranks, checkpoints, layout) -> None:
    path = str(checkpoints["llama-gqa-untied"])
    clean = ranks(judge_fresh_pieces, 2, args=(path, layout, None))
    assert all(v[0] for rank in clean for v in rank.values()), clean
    assert sum(rank["score.weight"][2] for rank in clean if rank) == 96  # pieces of 3 x 32
    bad = max(r for r, rank in enumerate(clean) if rank)
    planted = ranks(judge_fresh_pieces, 2, args=(path, layout, bad))
    assert all(rank["score.weight"][0] for r, rank in enumerate(planted) if rank and r != bad)
    ok, sentence, _ = planted[bad]["score.weight"]
    assert not ok and "uninitialised memory?" in sentence, sentence
