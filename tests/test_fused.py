"""The oracle's fused targets: every box of every MoE expert tensor, rebuilt from the checkpoint
with transformers' own conversion ops, equals that slice of what ``from_pretrained`` loaded,
and reading it touches only the sources (and the slices of them) that the box needs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers.core_model_loading",
                    reason="transformers 4.x fuses no weights on load: nothing to rebuild")

import torch  # noqa: E402
import transformers as T  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers.core_model_loading import (  # noqa: E402
    Chunk,
    Concatenate,
    Interleave,
    MergeModulelist,
    Transpose,
    WeightConverter,
)

from smpcheck.expect.fused import Box, FusedMap, build_expected, fused_targets, targets_of
from tests.models import MOE_FAMILIES, write_checkpoint


class SliceReader:
    """The lead's reader contract: ``read(key, box)`` from the safetensors file, logged."""

    def __init__(self, path: Path) -> None:
        self.handle = safe_open(str(path / "model.safetensors"), framework="pt")
        self.reads: list[tuple[str, Box | None]] = []
        self.numel = 0

    def shapes(self) -> dict[str, list[int]]:
        return {k: self.handle.get_slice(k).get_shape() for k in self.handle.keys()}

    def __call__(self, key: str, box: Box | None) -> torch.Tensor:
        self.reads.append((key, box))
        piece = self.handle.get_slice(key)
        value = piece[:] if box is None else piece[tuple(slice(a, b) for a, b in box)]
        self.numel += value.numel()
        return value


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: write_checkpoint(cls(**kw), root / name) for name, (cls, kw) in
            MOE_FAMILIES.items()}


def _splits(n: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk's split of ``n`` (DTensor's uneven shards: the last may be short or empty)."""
    size = -(-n // parts)
    return [(min(i * size, n), min((i + 1) * size, n)) for i in range(parts)]


def boxes(shape: tuple[int, ...]) -> list[Box]:
    """What ranks hold: FSDP2 row shards, TP column shards on each inner dim (over 2 and 3,
    uneven ones crossing the gate/up boundary), the rows covering FSDP1 flat ranges, and an
    inner box."""
    full = tuple((0, n) for n in shape)
    out: list[Box] = [full]
    for dim in range(len(shape)):
        for parts in (2, 3):
            out += [(*full[:dim], span, *full[dim + 1:]) for span in _splits(shape[dim], parts)]
    row = math.prod(shape[1:])
    for a, b in _splits(math.prod(shape), 3):  # FSDP1: a flat range, read as covering rows
        out.append(((a // row, -(-b // row)), *full[1:]))
    out.append(tuple((n // 4, n // 4 + max(1, n // 3)) for n in shape))
    return out


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_every_box_of_every_fused_target_equals_from_pretrained(moe, family) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(moe[family])
    loaded = model.state_dict()
    reader = SliceReader(moe[family])
    fused = fused_targets(model, reader.shapes())
    assert sorted(fused.targets) == sorted(n for n in loaded if ".mlp.experts." in n)
    assert fused.unsupported == {}
    for name, target in fused.targets.items():
        assert target.shape == tuple(loaded[name].shape)
        for box in boxes(target.shape):
            reader.numel = 0
            built = build_expected(target, reader, box)
            want = loaded[name][tuple(slice(a, b) for a, b in box)]
            assert torch.equal(built, want) and built.dtype == want.dtype, (name, box)
            # Only the box's own elements were read (stack and concat need nothing more); an
            # empty box (a rank with no rows) reads a single element, for the dtype.
            assert reader.numel == (want.numel() or 1), (name, box, reader.numel)


def test_a_box_of_two_experts_reads_only_those_experts(moe) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(moe["mixtral"])
    reader = SliceReader(moe["mixtral"])
    fused = fused_targets(model, reader.shapes())
    target = fused.targets["model.layers.1.mlp.experts.gate_up_proj"]
    _, rows, cols = target.shape
    build_expected(target, reader, ((2, 4), (0, rows), (0, cols)))
    assert sorted(reader.reads) == [
        (f"model.layers.1.block_sparse_moe.experts.{i}.{w}.weight", None)
        for i in (2, 3) for w in ("w1", "w3")]
    reader.reads.clear()
    # The up half of expert 0 only: w1 (gate) is asked for nothing, w3 for its first rows.
    build_expected(target, reader, ((0, 1), (rows // 2, rows // 2 + 5), (0, cols)))
    assert reader.reads == [
        ("model.layers.1.block_sparse_moe.experts.0.w1.weight", ((0, 0), (0, cols))),
        ("model.layers.1.block_sparse_moe.experts.0.w3.weight", ((0, 5), (0, cols)))]


def test_casts_like_from_pretrained(tmp_path) -> None:
    cls, kwargs = MOE_FAMILIES["qwen2-moe"]
    path = write_checkpoint(cls(**kwargs), tmp_path / "bf16", dtype=torch.bfloat16)
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reader = SliceReader(path)
    for name, target in fused_targets(model, reader.shapes()).targets.items():
        built = build_expected(target, reader, None, dtype=torch.float32)
        assert built.dtype == torch.float32 and torch.equal(built, model.state_dict()[name])


def test_inverse_map_covers_exactly_the_expert_keys(moe) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(moe["mixtral"])
    reader = SliceReader(moe["mixtral"])
    fused = fused_targets(model, reader.shapes())
    experts = {k for k in reader.shapes() if ".experts." in k}
    assert set(fused.by_key) == experts
    for key, names in fused.by_key.items():
        assert len(names) == 1 and key in fused.targets[names[0]].keys
    assert fused.by_key["model.layers.0.block_sparse_moe.experts.3.w2.weight"] == (
        "model.layers.0.mlp.experts.down_proj",)
    # A meta skeleton of the model (what a check has at hand) lists the same targets.
    with torch.device("meta"):
        skeleton = T.AutoModelForCausalLM.from_config(model.config)
    again = fused_targets(skeleton, reader.shapes())
    assert again.by_key == fused.by_key
    assert {n: (t.shape, t.sources, t.output) for n, t in again.targets.items()} == {
        n: (t.shape, t.sources, t.output) for n, t in fused.targets.items()}


def test_a_model_without_converters_has_no_fused_targets(checkpoints) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(checkpoints["llama-gqa-tied"])
    reader = SliceReader(checkpoints["llama-gqa-tied"])
    assert fused_targets(model, reader.shapes()) == FusedMap()


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


SYNTHETIC = {
    # one source cut into q, k, v (one-to-many): read whole along dim 0, cut after the op
    "chunk": (WeightConverter("attn.Wqkv", ["attn.q", "attn.k", "attn.v"], [Chunk(dim=0)]),
              {"attn.Wqkv": [(24, 10)]}),
    "transpose": (WeightConverter("experts.w", "experts.w_t", [Transpose(1, 2)]),
                  {"experts.w": [(3, 6, 4)]}),
    "merge-transpose": (WeightConverter("experts.*.w", "experts.w", [MergeModulelist(0),
                                                                    Transpose(1, 2)]),
                        {"experts.*.w": [(6, 4)] * 5}),
    "concat-lists": (WeightConverter(["attn.q", "attn.k"], "attn.qk", [Concatenate(dim=0)]),
                     {"attn.q": [(8, 6)], "attn.k": [(4, 6)]}),
    # no box rule: the chain runs on whole sources, the result is cut
    "interleave-fallback": (WeightConverter("mlp.w", "mlp.w_i", [Interleave(dim=0)]),
                            {"mlp.w": [(8, 3)]}),
}


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_each_op_rule_matches_transformers_own_converter(case) -> None:
    """Each op's box rule against ``WeightConverter.convert`` on whole tensors."""
    converter, layout = SYNTHETIC[case]
    sources = {p: [f"layers.0.{p.replace('*', str(i))}" for i in range(len(shapes))]
               for p, shapes in layout.items()}
    stored = {k: _random(shape, seed) for seed, (k, shape) in enumerate(
        (k, s) for p, shapes in layout.items() for k, s in zip(sources[p], shapes))}
    layer = f"layers.0.{converter.target_patterns[0]}"
    for p, keys in sources.items():
        for key in keys:
            converter.add_tensor(layer, key, p, lambda t=stored[key]: t)
    want = converter.convert(layer)
    targets = targets_of(converter, list(sources.items()),
                         {k: t.shape for k, t in stored.items()}, layer_name=layer)
    assert sorted(targets) == sorted(want)

    read_numel = [0]

    def read(key: str, box: Box | None) -> torch.Tensor:
        value = stored[key] if box is None else stored[key][tuple(slice(a, b) for a, b in box)]
        read_numel[0] += value.numel()
        return value

    for name, target in targets.items():
        assert target.shape == tuple(want[name].shape)
        for box in boxes(target.shape):
            read_numel[0] = 0
            assert torch.equal(build_expected(target, read, box),
                               want[name][tuple(slice(a, b) for a, b in box)]), (name, box)
        # The last box is a small inner one: a box rule reads less than every source whole.
        whole = sum(t.numel() for t in stored.values())
        assert (read_numel[0] == whole) == case.endswith("fallback"), (name, read_numel)


def test_a_box_that_does_not_fit_is_refused(moe) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(moe["mixtral"])
    reader = SliceReader(moe["mixtral"])
    target = fused_targets(model, reader.shapes()).targets["model.layers.0.mlp.experts.down_proj"]
    with pytest.raises(ValueError, match="does not fit model.layers.0.mlp.experts.down_proj"):
        build_expected(target, reader, ((0, 5), (0, 32), (0, 64)))

