"""coverage: the ranks' pieces of every stored tensor tile its stored shape exactly.

Unit tests of the tiling logic on hand-made parts (boxes, FSDP1 flat ranges, replicas), then
real gloo groups: every correct setup passes, and a sharded tensor one row short of the stored
one (which checkpoint parity, comparing slice with slice, passes) fails naming the tensor and
both shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers as T
from torch import nn

import smpcheck
from smpcheck.checks.coverage import Part, tiling_problems
from tests.faults import SETUPS, build

WHOLE = Part((((0, 4),), ((0, 6),)))
TOP, BOTTOM = Part((((0, 2),), ((0, 6),))), Part((((2, 4),), ((0, 6),)))


def test_whole_replicas_and_row_shards_tile() -> None:
    assert tiling_problems((4, 6), [WHOLE, WHOLE]) == []
    assert tiling_problems((4, 6), [TOP, BOTTOM, TOP]) == []  # a replica counts once


def test_a_missing_row_block_is_named_with_its_count() -> None:
    assert tiling_problems((4, 6), [TOP]) == ["12 of 24 elements are held by no rank"]


def test_overlapping_different_parts_are_named() -> None:
    middle = Part((((1, 3),), ((0, 6),)))
    problems = tiling_problems((4, 6), [TOP, middle, BOTTOM])
    assert len(problems) == 1 and "overlapping" in problems[0]


def test_strided_boxes_tile() -> None:
    """A packed [gate | up] weight split block by block: two boxes per rank."""
    rank0 = Part((((0, 2), (4, 6)), ((0, 3),)))
    rank1 = Part((((2, 4), (6, 8)), ((0, 3),)))
    assert tiling_problems((8, 3), [rank0, rank1]) == []
    assert tiling_problems((8, 3), [rank0]) == ["12 of 24 elements are held by no rank"]


def test_fsdp1_flat_ranges_tile_their_shard() -> None:
    runs = (((0, 4),), ((0, 6),))
    assert tiling_problems((4, 6), [Part(runs, (0, 13)), Part(runs, (13, 24))]) == []
    assert tiling_problems((4, 6), [Part(runs, (0, 13)), Part(runs, (14, 24))]) == [
        "1 of 24 elements are held by no rank"]
    overlap = tiling_problems((4, 6), [Part(runs, (0, 14)), Part(runs, (13, 24))])
    assert overlap == ["two ranks' FSDP1 flat ranges of the same shard overlap"]


def test_fsdp1_over_tp_shards() -> None:
    """FSDP1 flattening a TP shard: flat ranges within each TP part, parts across ranks."""
    top, bottom = TOP.runs, BOTTOM.runs
    parts = [Part(top, (0, 5)), Part(top, (5, 12)), Part(bottom, (0, 12))]
    assert tiling_problems((4, 6), parts) == []
    assert tiling_problems((4, 6), parts[:2]) == ["12 of 24 elements are held by no rank"]


def test_zero_dim_and_empty_shards() -> None:
    assert tiling_problems((), [Part(())]) == []
    empty = Part((((4, 4),), ((0, 6),)))  # an uneven FSDP2 shard holding no rows
    assert tiling_problems((4, 6), [Part((((0, 4),), ((0, 6),))), empty]) == []


def _statuses(report: smpcheck.Report) -> dict:
    return {r.name: (r.status.value, [f.sentence() for f in r.findings])
            for r in report.results}


def clean(path: str, setup: str) -> dict:
    model, _ = build(path, setup)
    return _statuses(smpcheck.verify(model, checkpoint=path,
                                     checks=["checkpoint_parity", "coverage"]))


@pytest.mark.parametrize("setup", [s for s in SETUPS if s != "tp-fsdp2"])
def test_correct_setups_are_covered(ranks, checkpoints, setup) -> None:
    out = ranks(clean, 2, args=(str(checkpoints["llama-gqa-untied"]), setup))[0]
    assert out["coverage"][0] == "pass", out
    assert out["checkpoint_parity"][0] == "pass", out


def one_row_short(path: str) -> dict:
    """Every rank loads, then ``lm_head`` loses its last row before FSDP2 shards it: each
    rank's slice still equals the same slice of the file."""
    from torch.distributed.fsdp import fully_shard

    model = T.AutoModelForCausalLM.from_pretrained(path)
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach()[:-1].clone())
    head.out_features -= 1
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert dist.get_world_size() == 2
    with torch.no_grad():
        return _statuses(smpcheck.verify(model, checkpoint=path,
                                         checks=["checkpoint_parity", "coverage"]))


def test_a_tensor_one_row_short_fails_naming_both_shapes(ranks, checkpoints) -> None:
    out = ranks(one_row_short, 2, args=(str(checkpoints["llama-gqa-untied"]),))
    assert out[0] == out[1]
    status, findings = out[0]["coverage"]
    assert out[0]["checkpoint_parity"][0] == "pass", "slice by slice, the rows agree"
    assert status == "fail" and len(findings) == 1, out[0]
    assert findings[0].startswith("lm_head.weight (ranks 0, 1): holds a tensor of global shape "
                                  "(95, 32), but checkpoint 'lm_head.weight' stores (96, 32)")
