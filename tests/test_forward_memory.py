"""The forward checks cost what a training forward under the same wrapping costs, and leave the
model as the caller had it: every FSDP unit sharded before is sharded after (FSDP1 and FSDP2
keep their root unsharded after a forward, for a backward an inference pass never runs), a
unit the caller left unsharded stays so, and the caller's gradients are given back."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.distributed as dist
import transformers as T

import smpcheck
from reference_impl import DelayedParamIniter, apply_fsdp2, load_on_rank0
from smpcheck.checks.unsharding import unit_sizes
from smpcheck.memory import MemoryMonitor, ModelSize, memory_bound, read_status
from tests.faults import build
from tests.models import write_checkpoint

MIB = 2**20


def _state(model: torch.nn.Module) -> list[tuple[str, bool, tuple[int, ...]]]:
    """Per FSDP unit: sharded or not; and which parameter objects the model registers."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    units = []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            groups = module._get_fsdp_state()._fsdp_param_groups
            units.append((name, all(g.is_sharded for g in groups)))
        elif isinstance(module, FullyShardedDataParallel) and module._handle is not None:
            flat = module._handle.flat_param  # sharded: no unsharded storage allocated
            full = getattr(flat, "_full_param_padded", None)
            units.append((name, full is None or full.untyped_storage().size() == 0))
    return [(*u, ()) for u in units] + [("params", True, tuple(id(p) for p in model.parameters()))]


def as_before(path: str, setup: str, checks: list[str], unshard_root: bool) -> dict:
    model, dense = build(path, setup)
    if unshard_root:
        model.unshard()  # the caller's choice: it must survive the check
    before = _state(model)
    report = smpcheck.verify(model, dense_model=dense, checks=checks)
    after = _state(model)
    if unshard_root:
        model.reshard()
    return {"statuses": {r.name: r.status.value for r in report.results}, "ok": report.ok,
            "before": before, "after": after,
            "sharded": sum(s for _, s, _ in before[:-1]), "messages": report.summary()}


@pytest.mark.parametrize("setup,checks", [
    ("fsdp2", ["forward"]),
    ("fsdp1", ["forward"]),
    ("fsdp1-flat", ["forward"]),
    ("tp-fsdp2", ["forward"]),
    ("tp-fsdp2", ["forward", "tp_numerics"]),
])
def test_every_unit_sharded_before_is_sharded_after(ranks, checkpoints, setup, checks) -> None:
    world = 4 if setup == "tp-fsdp2" else 2
    outs = ranks(as_before, world, args=(str(checkpoints["llama-gqa-untied"]), setup, checks,
                                         False))
    for out in outs:
        assert out["ok"], out["messages"]
        assert out["sharded"] >= 3, out["before"]  # the root and both layers were sharded
        assert out["after"] == out["before"]


def test_a_root_the_caller_left_unsharded_stays_unsharded(ranks, checkpoints) -> None:
    outs = ranks(as_before, 2, args=(str(checkpoints["llama-gqa-untied"]), "fsdp2",
                                     ["forward"], True))
    for out in outs:
        assert out["ok"], out["messages"]
        root = out["before"][0]
        assert root[0] == "" and root[1] is False  # unsharded by the caller
        assert out["after"] == out["before"]


def grads_given_back(path: str) -> dict:
    model, dense = build(path, "tp")
    param = next(p for p in model.parameters() if p.requires_grad)
    mine = torch.ones_like(param)
    param.grad = mine
    report = smpcheck.verify(model, dense_model=dense, checks=["tp_numerics"])
    return {"status": report.results[0].status.value, "message": report.summary(),
            "same": param.grad is mine, "ones": bool((param.grad.to_local() == 1).all())
            if hasattr(param.grad, "to_local") else bool((param.grad == 1).all())}


def test_tp_numerics_gives_the_callers_gradients_back(ranks, checkpoints) -> None:
    for out in ranks(grads_given_back, 2, args=(str(checkpoints["llama-gqa-untied"]),)):
        assert out["status"] == "pass", out["message"]  # not compared with theirs added in
        assert out["same"] and out["ones"]


def _anon() -> int:
    return read_status()["RssAnon"]


def forward_memory(path: str) -> dict:
    """FSDP2 over a model whose root (embeddings + head) dominates: what the forward check
    adds to the peak, and what it leaves behind."""
    libc = ctypes.CDLL("libc.so.6")
    model = load_on_rank0(path)
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    model = apply_fsdp2(model, device="cpu", initer=initer)
    units = unit_sizes(model)
    smpcheck.verify(model, checks=["forward"])  # what any first call pays: lazy imports
    libc.malloc_trim(0)
    with MemoryMonitor(rank=dist.get_rank(), interval=0.001) as monitor:
        with monitor.phase("load"):
            pass
        start = _anon()
        with monitor.phase("forward") as phase:
            report = smpcheck.verify(model, checks=["forward"])
        libc.malloc_trim(0)  # what the gather and the judging freed since the check's trim
        left = _anon() - start
    size = ModelSize(sum(p.numel() * p.element_size() for p in model.parameters()) *
                     dist.get_world_size(), 0, 0)
    bound = memory_bound(rank=dist.get_rank(), baseline=monitor.record.baseline_anon,
                         size=size, strategy="fsdp2", world_size=dist.get_world_size())
    memory = smpcheck.verify(model, checks=["memory"], memory=(monitor.record, bound))
    return {"ok": report.ok, "forward": report.results[0].message,
            "memory": memory.results[0].message, "root": units.root,
            "largest": units.largest, "added": phase.peak_anon - start, "left": left}


def test_the_forward_holds_one_unit_beside_the_root_and_leaves_nothing(ranks, tmp_path) -> None:
    config = T.LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, tie_word_embeddings=False)
    path = write_checkpoint(config, tmp_path / "wide-vocab")
    root = 2 * 32000 * 128 * 4 + 128 * 4  # embeddings, head, final norm (fp32)
    for out in ranks(forward_memory, 2, args=(str(path),)):
        assert out["ok"], out["forward"]
        assert out["root"] == root
        assert 0 < out["largest"] < root / 20
        # the root unsharded once (while gathered: FSDP2's gather buffer, and on gloo a buffer
        # of gloo's own), one layer at a time beside it, the tiny batch's activations
        assert out["added"] <= 3 * out["root"] + 2 * out["largest"] + 8 * MIB, out
        # the root resharded and freed pages handed back; one buffer of the root's size is at
        # times still referenced after a call (released by the next), nothing more
        assert out["left"] <= out["root"] + 4 * MIB, out
        assert f"root unit ({root / MIB:.1f} MiB)" in out["forward"]
        assert "the forward phase added" in out["memory"]
        assert f"beside the root unit of {root / MIB:.0f} MiB" in out["memory"]
