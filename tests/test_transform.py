"""The tensor-parallel transform, alone and composed with FSDP1 and FSDP2, on real gloo groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Shard
from torch.utils._python_dispatch import TorchDispatchMode

from reference_impl import apply_fsdp1, apply_fsdp2, load_on_rank0
from reference_impl.transform import build_mesh, transform
from smpcheck.runner import RankError
from smpcheck.shards.tensors import local_view, named_tensors
from tests.models import FAMILIES, MIXTRAL, write_checkpoint

# fp32 throughout; TP changes only the order of the reductions (row-parallel partial sums),
# so differences stay at a few ulps of the values involved.
ATOL = 2e-5
TP_FAMILIES = ["llama-gqa-tied", "llama-gqa-untied", "mistral", "qwen2", "gpt-neox", "mixtral"]


@pytest.fixture(scope="module")
def tp_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    config_cls, kwargs = MIXTRAL
    mixtral = write_checkpoint(config_cls(**kwargs), tmp_path_factory.mktemp("moe") / "mixtral")
    return {**{f: checkpoints[f] for f in TP_FAMILIES if f in FAMILIES}, "mixtral": mixtral}


def shard_mismatches(
    model: torch.nn.Module, dense: dict[str, torch.Tensor], coord: int, tp: int
) -> tuple[list[str], int]:
    """Names of DTensor shards that are not the right slice of the checkpoint tensor."""
    bad, sharded = [], 0
    for name, tensor in named_tensors(model):
        dims = [p.dim for p in getattr(tensor, "placements", ()) if isinstance(p, Shard)]
        expected = dense[name].chunk(tp, dim=dims[0])[coord] if dims else dense[name]
        sharded += bool(dims)
        if not torch.equal(local_view(tensor).detach(), expected):
            bad.append(name)
    return bad, sharded


def full_grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def tp_run(path: str, tp: int, fsdp: str | None, steps: int = 3) -> dict:
    """Transform from rank 0, check shards, optionally wrap, then train next to the dense."""
    rank = dist.get_rank()
    mesh = build_mesh("cpu", tp)
    model = transform(
        load_on_rank0(path), device_mesh=mesh, device="cpu", load_state_dict_from_rank0=True
    )
    dense = load_on_rank0(path, rank=0)
    expected = {n: t.detach().clone() for n, t in named_tensors(dense)}
    coord = mesh["tp"].get_local_rank()
    bad_shards, sharded = shard_mismatches(model, expected, coord, tp)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if fsdp == "fsdp1":
        model = apply_fsdp1(model, device="cpu", device_mesh=mesh["dp"])
    elif fsdp == "fsdp2":
        model = apply_fsdp2(model, device="cpu", mesh=mesh["dp"], load_from_rank0=False)
    vocab = dense.config.vocab_size
    ids = (torch.arange(24).view(2, 12) * 7 + 3 * mesh["dp"].get_local_rank()) % vocab
    ids_all = [torch.zeros_like(ids) for _ in range(mesh["dp"].size())]
    dist.all_gather(ids_all, ids, group=mesh["dp"].get_group())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.5)
    losses, grad_diff, logits_diff = [], 0.0, 0.0
    for step in range(steps):
        out = model(ids, labels=ids)
        # Data parallel: each replica its own batch; the dense model sees them all.
        dense_out = dense(torch.cat(ids_all), labels=torch.cat(ids_all))
        dense_mine = dense_out.logits.view(len(ids_all), *ids.shape, -1)[
            mesh["dp"].get_local_rank()
        ]
        logits_diff = max(logits_diff, (out.logits - dense_mine).abs().max().item())
        local_loss = out.loss
        out.loss.backward()
        dense_out.loss.backward()
        if step == 0 and fsdp != "fsdp1":  # FSDP1 keeps flat grads; steps check it below
            # FSDP averages over replicas of equal token counts: the dense batch's gradient.
            dense_params = dict(dense.named_parameters())
            for name, param in named_tensors(model):
                if isinstance(param, torch.nn.Parameter) and name in dense_params:
                    diff = full_grad(param) - dense_params[name].grad
                    grad_diff = max(grad_diff, diff.abs().max().item())
        opt.step()
        dense_opt.step()
        opt.zero_grad()
        dense_opt.zero_grad()
        mean_loss = local_loss.detach().clone()
        dist.all_reduce(mean_loss, group=mesh["dp"].get_group())
        losses.append((mean_loss.item() / mesh["dp"].size(), dense_out.loss.item()))
    return {
        "rank": rank,
        "bad_shards": bad_shards,
        "sharded": sharded,
        "tied": tied,
        "logits_diff": logits_diff,
        "grad_diff": grad_diff,
        "losses": losses,
    }


@pytest.mark.parametrize(
    ("world", "fsdp"),
    [(2, None), (4, "fsdp1"), (4, "fsdp2")],
    ids=["tp2", "tp2xdp2-fsdp1", "tp2xdp2-fsdp2"],
)
@pytest.mark.parametrize("family", TP_FAMILIES)
def test_tp_matches_dense(ranks, tp_checkpoints, family, world, fsdp) -> None:
    if family == "llama-gqa-tied" and fsdp == "fsdp1":
        with pytest.raises(
            RankError,
            match="FSDP1 cannot train the tied tensor-parallel "
            r"parameter \[model.embed_tokens.weight, lm_head.weight\]",
        ):
            ranks(tp_run, world, args=(str(tp_checkpoints[family]), 2, fsdp))
        return
    results = ranks(tp_run, world, args=(str(tp_checkpoints[family]), 2, fsdp))
    for res in results:
        assert not res["bad_shards"], res
        assert res["sharded"] >= 8, "attention, embedding and head must be sharded"
        assert res["logits_diff"] <= ATOL, res
        assert res["grad_diff"] <= ATOL, res
        for tp_loss, dense_loss in res["losses"]:
            assert tp_loss == pytest.approx(dense_loss, rel=1e-5, abs=ATOL), res["losses"]
        assert res["tied"] == (family == "llama-gqa-tied")


def transform_only(path: str, tp: int) -> str:
    transform(load_on_rank0(path), tp_size=tp, device="cpu", load_state_dict_from_rank0=True)
    return "ok"


def test_config_errors_are_sentences_on_every_rank(ranks, tmp_path, tp_checkpoints) -> None:
    kv1 = write_checkpoint(
        T.LlamaConfig(**{**FAMILIES["llama-gqa-tied"][1], "num_key_value_heads": 1}),
        tmp_path / "kv1",
    )
    odd_vocab = write_checkpoint(
        T.LlamaConfig(**{**FAMILIES["llama-gqa-tied"][1], "vocab_size": 97}), tmp_path / "v97"
    )
    gpt2 = write_checkpoint(T.GPT2Config(**FAMILIES["gpt2"][1]), tmp_path / "gpt2")
    cases = [
        (kv1, 2, "num_key_value_heads=1 is not divisible by tp_size=2"),
        (odd_vocab, 2, "vocab_size=97 is not divisible by tp_size=2"),
        (tp_checkpoints["mistral"], 3, "tp_size=3 does not divide the world size 2"),
        (gpt2, 2, "not supported for model_type='gpt2'"),
    ]
    for path, tp, sentence in cases:
        with pytest.raises(RankError) as err:
            ranks(transform_only, 2, args=(str(path), tp), timeout=60)
        assert "TPConfigError" in err.value.exc_type and sentence in str(err.value)
        assert err.value.failed_ranks == [0, 1], "every rank must raise, none may hang"


class AllocationRecorder(TorchDispatchMode):
    """Largest plain (non-meta) tensor any aten op returned while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor and not t.is_meta:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def meta_rank_allocations(path: str) -> dict:
    model = load_on_rank0(path)
    sizes = {n: t.numel() * t.element_size() for n, t in named_tensors(model)}
    recorder = AllocationRecorder()
    with recorder:
        model = transform(model, tp_size=2, device="cpu", load_state_dict_from_rank0=True)
    sharded = [
        n
        for n, t in named_tensors(model)
        if getattr(t, "placements", None) and isinstance(t.placements[0], Shard)
    ]
    return {
        "largest_alloc": recorder.largest,
        "largest_sharded_full": max(sizes[n] for n in sharded),
        "largest_replicated": max(sizes[n] for n in sizes if n not in sharded),
    }


def test_meta_rank_never_holds_a_full_sharded_tensor(ranks, tmp_path) -> None:
    # A vocabulary big enough that the embedding dwarfs everything replicated.
    config = T.LlamaConfig(**{**FAMILIES["llama-gqa-untied"][1], "vocab_size": 4096})
    path = write_checkpoint(config, tmp_path / "bigvocab")
    _, meta_rank = ranks(meta_rank_allocations, 2, args=(str(path),), timeout=60)
    full = meta_rank["largest_sharded_full"]
    assert full == 4096 * 32 * 4
    assert meta_rank["largest_replicated"] < full // 2
    # Measured: the largest tensor rank 1 ever allocated is exactly one shard.
    assert meta_rank["largest_alloc"] == full // 2, meta_rank


hyp_llama = st.fixed_dictionaries(
    {
        "num_hidden_layers": st.integers(1, 2),
        "num_key_value_heads": st.sampled_from([1, 2, 3]),
        "groups": st.sampled_from([1, 2]),
        "head_dim": st.sampled_from([4, 8]),
        "vocab_size": st.sampled_from([48, 49]),
        "intermediate_size": st.sampled_from([32, 33]),
        "tie_word_embeddings": st.booleans(),
    }
)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=hyp_llama)
def test_hypothesis_valid_configs_match_invalid_ones_raise(ranks, tmp_path_factory, spec) -> None:
    groups, head_dim = spec.pop("groups"), spec.pop("head_dim")
    heads = spec["num_key_value_heads"] * groups
    config = T.LlamaConfig(
        **spec,
        num_attention_heads=heads,
        hidden_size=heads * head_dim,
        head_dim=head_dim,
        max_position_embeddings=32,
    )
    path = write_checkpoint(config, tmp_path_factory.mktemp("hyp-tp"))
    valid = all(
        v % 2 == 0
        for v in (heads, spec["num_key_value_heads"], spec["vocab_size"], spec["intermediate_size"])
    )
    if not valid:
        with pytest.raises(RankError) as err:
            ranks(tp_run, 2, args=(str(path), 2, None, 1), timeout=60)
        assert "TPConfigError" in err.value.exc_type and "not divisible by tp_size=2" in str(
            err.value
        )
        return
    for res in ranks(tp_run, 2, args=(str(path), 2, None, 1), timeout=60):
        assert not res["bad_shards"] and res["logits_diff"] <= ATOL and res["grad_diff"] <= ATOL
