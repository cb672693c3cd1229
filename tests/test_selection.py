"""Selections cut exactly what DTensor cuts: every placement torch knows, on real meshes, and
reading a selection from a safetensors file gives the same bytes as slicing the full tensor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from smpcheck.checkpoint import Checkpoint
from smpcheck.shards.selection import Selection, as_runs, flat_selection

SHAPES = [(12, 8), (7, 5), (3,), (10, 6, 4)]


def placements_for(ndim: int) -> list[tuple]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = [(Shard(0), Shard(0)), (Shard(0), Replicate()), (Replicate(), Shard(ndim - 1)),
           (_StridedShard(0, split_factor=2), Shard(0))]
    if ndim > 1:
        out += [(Shard(1), Shard(0)), (Shard(0), Shard(1)), (Replicate(), _StridedShard(
            ndim - 2, split_factor=2))]
    return out


def cut_like_dtensor(path: str) -> list[str]:
    """On a 2x2 mesh: every selection equals DTensor's local shard, from memory and from disk."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from smpcheck.shards.pieces import _piece

    mesh = init_device_mesh("cpu", (2, 2))
    problems = []
    ckpt = Checkpoint(path)
    for shape in SHAPES:
        full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
        key = "x" + "_".join(map(str, shape))
        for placements in placements_for(len(shape)):
            dtensor = distribute_tensor(full, mesh, placements, src_data_rank=None)
            piece = _piece(key, dtensor, True, True)
            want = dtensor.to_local()
            from_memory = piece.selection.take(full)
            from_disk = piece.selection.assemble(lambda box, k=key: ckpt.read(k, box))
            if not (torch.equal(from_memory, want) and torch.equal(from_disk, want)):
                problems.append(f"rank {dist.get_rank()} {shape} {placements}")
    return problems


def test_selections_cut_what_dtensor_cuts(ranks, tmp_path) -> None:
    tensors = {"x" + "_".join(map(str, s)): torch.arange(float(torch.Size(s).numel())).reshape(s)
               for s in SHAPES}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    assert ranks(cut_like_dtensor, 4, args=(str(tmp_path / "t.safetensors"),)) == [[]] * 4


def test_runs_keep_local_order() -> None:
    assert as_runs([0, 1, 2, 8, 9]) == ((0, 3), (8, 10))
    assert as_runs([8, 9, 0, 1]) == ((8, 10), (0, 2))
    assert as_runs([]) == ()


@pytest.mark.parametrize(("flat", "rows"), [((0, 8), ((0, 1),)), ((3, 13), ((0, 2),)),
                                            ((8, 16), ((1, 2),)), ((15, 40), ((1, 5),))])
def test_an_fsdp1_range_reads_only_the_rows_that_hold_it(flat, rows) -> None:
    full = torch.arange(40.0).reshape(5, 8)
    selection = flat_selection((5, 8), Selection.whole((5, 8)).runs, flat)
    assert selection.runs[0] == rows
    assert torch.equal(selection.take(full), full.reshape(-1)[flat[0]:flat[1]])
    assert selection.elements_read <= (flat[1] - flat[0]) + 2 * 8


def test_a_range_inside_a_tp_shard_maps_to_global_rows() -> None:
    full = torch.arange(64.0).reshape(8, 8)
    tp_rows = ((4, 8),)  # the second TP rank's rows
    selection = flat_selection((8, 8), (tp_rows, ((0, 8),)), (10, 20))
    assert selection.runs[0] == ((5, 7),)  # local rows 1 and 2 hold elements 10..19
    assert torch.equal(selection.take(full), full[4:8].reshape(-1)[10:20])


def test_zero_dim_and_whole_selections() -> None:
    scalar = torch.tensor(3.0)
    assert torch.equal(Selection.whole(()).take(scalar), scalar)
    assert Selection.whole((4, 2)).is_whole and Selection.whole((4, 2)).describe() == "whole (4, 2)"
