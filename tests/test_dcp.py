"""A torch.distributed.checkpoint (DCP) directory as the expected-value source.

On real gloo groups: a tiny Llama wrapped with FSDP2 is saved with ``dcp.save`` (accelerate's
``{"model": state_dict}`` inside a Trainer folder, and bare), then a fresh model loaded from
the safetensors is verified against it; a planted element, a dropped key and a truncated file
are named, and DCPs written under other shardings (FSDP1, plain replicas) compare exactly.
In-process: box reads across chunk boundaries, what a box costs, the ``model.`` level, the
factory and every broken-file sentence.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers as T
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

import smpcheck
from reference_impl import load_on_rank0
from smpcheck.checkpoint import Checkpoint, CheckpointError
from smpcheck.checkpoint.dcp import DcpCheckpoint, open_checkpoint
from smpcheck.shards.pieces import iter_pieces
from tests.faults import build, plant
from tests.models import FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dcp's no_dist notice
CHECKS = ["checkpoint_parity", "coverage", "config_parity"]
PLANTED = "model.layers.0.mlp.down_proj.weight"


# -- helpers -----------------------------------------------------------------------------------
def _cuts(n: int, uneven: bool) -> list[tuple[int, int]]:
    """Cuts of [0, n): uneven in three (one element, then two halves of the rest), or even
    in two."""
    edges = [0, 1, 1 + (n - 1) // 2, n] if uneven else [0, n // 2, n]
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < b]


class GridPlanner(DefaultSavePlanner):
    """Saves every tensor as a grid of chunks (3 uneven along dim 0, 2 along dim 1), as
    several ranks' shards would be, in one process: DCP's own write items and metadata."""

    def create_local_plan(self):  # noqa: ANN201 - DCP's SavePlan
        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            size = item.tensor_data.size if item.tensor_data is not None else None
            if item.type != WriteItemType.TENSOR or not size:
                items.append(item)
                continue
            grid = [_cuts(size[0], True), *([_cuts(size[1], False)] if len(size) > 1 else []),
                    *([(0, n)] for n in size[2:])]
            for runs in itertools.product(*grid):
                offsets = torch.Size([a for a, _ in runs])
                sizes = torch.Size([b - a for a, b in runs])
                items.append(WriteItem(
                    index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, sizes),
                                                item.tensor_data.properties, size)))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):  # noqa: ANN201
        if write_item.type != WriteItemType.SHARD:
            return super().resolve_data(write_item)
        tensor = self.state_dict[write_item.index.fqn]
        chunk = write_item.tensor_data.chunk
        for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes)):
            tensor = tensor.narrow(dim, start, length)
        return tensor.clone()


def _save(state_dict: dict, folder: Path, planner: DefaultSavePlanner | None = None) -> Path:
    dcp.save(state_dict, checkpoint_id=folder, no_dist=True, planner=planner)
    return folder


def _tiny_llama() -> torch.nn.Module:
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    torch.manual_seed(0)
    return T.LlamaForCausalLM(config_cls(**kwargs))


def _box_bytes(box: tuple[tuple[int, int], ...], dtype: torch.dtype) -> int:
    return math.prod(b - a for a, b in box) * dtype.itemsize


# -- in process: reads --------------------------------------------------------------------------
def test_box_reads_across_chunk_boundaries_are_exact(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(7, 6, generator=gen), "v": torch.randn(10, generator=gen),
               "c": torch.randn(5, 4, 3, generator=gen).to(torch.bfloat16),
               "s": torch.tensor(2.5)}
    reader = DcpCheckpoint(_save(dict(tensors), tmp_path / "grid", GridPlanner()))
    chunks = {k: len(md.chunks) for k, md in reader.metadata.state_dict_metadata.items()}
    assert chunks == {"w": 6, "v": 3, "c": 6, "s": 1}  # 0-d: one chunk
    boxes = {"w": [((0, 7), (0, 6)), ((0, 1), (0, 3)), ((0, 2), (2, 4)), ((3, 6), (1, 5)),
                   ((1, 7), (3, 6)), ((6, 7), (5, 6)), ((2, 2), (0, 6))],
             "v": [(a, b) for a in range(10) for b in range(a, 11)],
             "c": [((0, 5), (1, 3), (1, 2)), ((0, 2), (1, 4), (0, 3))],
             "s": [()]}
    for key, runs in boxes.items():
        for box in runs:
            box = (box,) if key == "v" else box
            before = reader.bytes_read
            got = reader.read(key, box)
            want = tensors[key][tuple(slice(a, b) for a, b in box)]
            assert got.dtype == want.dtype and torch.equal(got, want), (key, box)
            assert reader.bytes_read - before == _box_bytes(box, want.dtype)
        assert torch.equal(reader.read(key), tensors[key])
    with pytest.raises(CheckpointError, match=r"cannot read box .* of w: .*shape \[7, 6\]"):
        reader.read("w", ((0, 8), (0, 6)))


def test_a_box_costs_the_stored_chunks_it_overlaps(tmp_path) -> None:
    """bytes_read is the box; what DCP deserialises is every stored chunk the box touches,
    whole: one rank's box of a checkpoint saved under that sharding costs about the box."""
    weight = torch.randn(64, 256)  # 64 KiB: rows [0:1) [1:32) [32:64) x columns [0:128) [128:256)
    reader = DcpCheckpoint(_save({"w": weight}, tmp_path / "cost", GridPlanner()))
    chunks = reader.metadata.state_dict_metadata["w"].chunks
    sizes = {(tuple(c.offsets), tuple(c.sizes)) for c in chunks}
    assert ((32, 0), (32, 128)) in sizes
    box = ((32, 64), (0, 128))  # exactly one stored chunk: 16 KiB of a 64 KiB tensor
    assert torch.equal(reader.read("w", box), weight[32:, :128])
    assert reader.bytes_read == 16384
    assert 16384 <= reader.storage_bytes_read < 16384 + 4096  # + torch.save's framing
    inner = DcpCheckpoint(reader.path)  # a box inside that chunk still loads the chunk
    inner.read("w", ((40, 41), (0, 10)))
    assert inner.bytes_read == 40 and inner.storage_bytes_read == reader.storage_bytes_read
    whole = DcpCheckpoint(_save({"w": weight}, tmp_path / "whole"))  # one chunk: a replica
    whole.read("w", box)
    assert whole.bytes_read == 16384 and whole.storage_bytes_read >= 65536


# -- in process: keys ---------------------------------------------------------------------------
def test_the_model_level_is_stripped_only_where_it_was_saved(tmp_path) -> None:
    model = _tiny_llama()
    sd = model.state_dict()
    names = list(sd)
    nested = DcpCheckpoint(_save({"model": dict(sd), "optim": {"state": {
        "model.norm.weight": {"exp_avg": torch.zeros(32)}}}, "step": 7}, tmp_path / "nested"),
        model)
    assert sorted(nested.files) == sorted(names)
    assert nested.fqn("lm_head.weight") == "model.lm_head.weight"
    assert nested.optimizer_keys == ["optim.state.model.norm.weight.exp_avg"]
    assert all(nested.key_for(n, "model.") == n for n in names)
    assert torch.equal(nested.read("model.norm.weight"), sd["model.norm.weight"])
    bare = DcpCheckpoint(_save(dict(sd), tmp_path / "bare"), model)
    assert sorted(bare.files) == sorted(names)
    # A bare partial save whose keys all start with "model." keeps them: the planner data says
    # the state dict was not nested.
    partial = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    kept = DcpCheckpoint(_save(dict(partial), tmp_path / "partial"), model)
    assert sorted(kept.files) == sorted(partial) and kept.key_for("lm_head.weight") is None
    # No planner data (a state dict flattened by hand): the model's names decide.
    flat = _save({f"model.{k}": v for k, v in sd.items()}, tmp_path / "flat",
                 DefaultSavePlanner(flatten_state_dict=False))
    assert sorted(DcpCheckpoint(flat, model).files) == sorted(names)
    assert sorted(DcpCheckpoint(flat).files) == sorted(f"model.{k}" for k in names)


def test_open_checkpoint_picks_the_reader(tmp_path, checkpoints) -> None:
    safetensors = checkpoints["llama-gqa-untied"]
    assert type(open_checkpoint(safetensors)) is Checkpoint
    trainer = tmp_path / "checkpoint-10"
    _save({"model": {"w": torch.ones(3)}}, trainer / "pytorch_model_fsdp_0")
    _save({"optimizer": {"w": torch.ones(3)}}, trainer / "optimizer_0")
    shutil.copy(safetensors / "config.json", trainer / "config.json")
    reader = open_checkpoint(trainer)
    assert isinstance(reader, DcpCheckpoint)
    assert reader.path == trainer and reader.folder == trainer / "pytorch_model_fsdp_0"
    assert reader.files == {"w": trainer / "pytorch_model_fsdp_0" / "__0_0.distcp"}
    assert reader.dtypes == {"w": "float32"}
    assert reader.shape("w") == [3] and reader.fused_keys == []
    assert not reader.is_fused_target("w")
    assert reader.sizes() == reader.sizes(torch.float32) and reader.sizes().total == 12
    assert reader.sizes(torch.bfloat16).total == 6


def test_fingerprint_reads_little_and_sees_a_changed_byte(tmp_path) -> None:
    folder = _save({"model": {"w": torch.arange(4096.0)}}, tmp_path / "fp")
    first, again = DcpCheckpoint(folder), DcpCheckpoint(folder)
    digest = first.fingerprint()
    assert digest == again.fingerprint() and first.fingerprint_bytes > 0
    assert first.bytes_read == 0  # fingerprinting is counted apart from the comparisons
    data = next(folder.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 1  # inside the tensor's bytes
    data.write_bytes(bytes(raw))
    assert DcpCheckpoint(folder).fingerprint() != digest


# -- in process: broken files -------------------------------------------------------------------
def _one_sentence(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_broken_dcp_directories_are_one_sentence_naming_the_file(tmp_path) -> None:
    sd = {"model": {"w": torch.randn(6, 4), "b": torch.randn(6)}}

    lost = _save(sd, tmp_path / "lost")
    (lost / ".metadata").unlink()  # .distcp files left: still named as a DCP directory
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint(lost)
    _one_sentence(excinfo, str(lost / ".metadata"), "does not exist")

    garbage = _save(sd, tmp_path / "garbage")
    (garbage / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint(garbage)
    _one_sentence(excinfo, str(garbage / ".metadata"), "is not readable")

    other = _save(sd, tmp_path / "other")
    (other / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint(other)
    _one_sentence(excinfo, str(other / ".metadata"), "is not readable")

    missing = _save(sd, tmp_path / "missing")
    data = next(missing.glob("*.distcp"))
    data.unlink()
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint(missing)
    _one_sentence(excinfo, str(data), "does not exist")

    truncated = _save(sd, tmp_path / "truncated")
    data = next(truncated.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint(truncated)
    _one_sentence(excinfo, str(data), "is truncated")

    partial = _save(sd, tmp_path / "partial", GridPlanner())  # a rank's chunk not recorded
    metadata = pickle.loads((partial / ".metadata").read_bytes())
    metadata.state_dict_metadata["model.w"].chunks.pop()
    (partial / ".metadata").write_bytes(pickle.dumps(metadata))
    reader = open_checkpoint(partial)
    assert torch.equal(reader.read("w", ((0, 4), (0, 2))), sd["model"]["w"][:4, :2])
    with pytest.raises(CheckpointError) as excinfo:
        reader.read("w")
    _one_sentence(excinfo, str(partial / ".metadata"), "stores only 18 of the 24 elements of w")

    scrambled = _save(sd, tmp_path / "scrambled")  # the right size, the wrong bytes
    data = next(scrambled.glob("*.distcp"))
    data.write_bytes(bytes(len(data.read_bytes())))
    reader = open_checkpoint(scrambled)
    with pytest.raises(CheckpointError) as excinfo:
        reader.read("w")
    _one_sentence(excinfo, "cannot read w from", str(data))


# -- on real ranks ------------------------------------------------------------------------------
def _verdicts(report: smpcheck.Report) -> dict:
    return {r.name: (r.status.value, r.message, [(f.tensor, f.ranks, f.problem, f.severity)
                                                 for f in r.findings])
            for r in report.results} | {"ok": report.ok}


def _box_cost(model: torch.nn.Module, folder: Path) -> dict[str, int]:
    """This rank's boxes read from ``folder``: their bytes, what DCP deserialised, and the
    whole tensors' bytes."""
    reader = DcpCheckpoint(folder, model)
    whole = boxes = 0
    for piece in iter_pieces(model):
        key = reader.key_for(piece.name)
        if key is None:
            continue
        piece.selection.assemble(lambda box, key=key: reader.read(key, box))
        whole += math.prod(reader.shape(key)) * 4
        boxes += len(list(piece.selection.boxes()))
    return {"box": reader.bytes_read, "storage": reader.storage_bytes_read, "whole": whole,
            "boxes": boxes}


def fsdp2_round_trip(path: str, root: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    root_dir = Path(root)
    saved, _ = build(path, "fsdp2")
    sd = get_model_state_dict(saved)
    trainer = root_dir / "checkpoint-1"
    dcp.save({"model": sd}, checkpoint_id=trainer / "pytorch_model_fsdp_0")
    dcp.save(sd, checkpoint_id=root_dir / "bare")
    dcp.save({"model": {k: v for k, v in sd.items() if k != "lm_head.weight"}},
             checkpoint_id=root_dir / "partial")
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copy(Path(path) / "config.json", trainer / "config.json")
        shutil.copytree(root_dir / "bare", root_dir / "truncated")
        data = sorted((root_dir / "truncated").glob("*.distcp"))[-1]
        data.write_bytes(data.read_bytes()[:-64])
    dist.barrier()
    fresh, _ = build(path, "fsdp2")  # a fresh model loaded from the safetensors
    out = {name: _verdicts(smpcheck.verify(fresh, checkpoint=str(folder), checks=CHECKS))
           for name, folder in (("trainer", trainer), ("bare", root_dir / "bare"),
                                ("partial", root_dir / "partial"),
                                ("truncated", root_dir / "truncated"))}
    out["cost"] = _box_cost(fresh, trainer)
    if dist.get_rank() == 1:
        plant(fresh, PLANTED, "epsilon")  # one element, one rank
    out["planted"] = _verdicts(smpcheck.verify(fresh, checkpoint=str(trainer), checks=CHECKS))
    return out


def test_fsdp2_dcp_verifies_and_names_what_differs(ranks, checkpoints, tmp_path) -> None:
    path = str(checkpoints["llama-gqa-untied"])
    outs = ranks(fsdp2_round_trip, 2, args=(path, str(tmp_path / "dcp")), timeout=240)
    out = outs[0]
    for name in ("trainer", "bare"):
        assert out[name]["ok"], out[name]
        assert out[name]["checkpoint_parity"][0] == "pass" and not any(
            f[3] == "warning" for f in out[name]["checkpoint_parity"][2]), out[name]
        assert out[name]["coverage"][0] == "pass", out[name]
    assert "and with config.json" in out["trainer"]["config_parity"][1]  # checkpoint-N's
    assert out["bare"]["config_parity"][0] == "pass"  # no config.json: not a failure

    partial = out["partial"]["checkpoint_parity"]
    assert partial[0] == "fail"
    assert [f[:3] for f in partial[2] if f[3] == "error"] == [
        ("lm_head.weight", [0, 1], "in the model but not in the checkpoint")], partial

    status, message, _ = out["truncated"]["checkpoint_parity"]
    assert status == "error" and "CheckpointError" in message and "is truncated" in message
    assert str(tmp_path / "dcp" / "truncated") in message and "\n" not in message

    planted = outs[1]["planted"]["checkpoint_parity"]
    assert planted[0] == "fail"
    errors = [f for f in planted[2] if f[3] == "error"]
    assert [(f[0], f[1]) for f in errors] == [(PLANTED, [1])], planted
    assert outs[1]["planted"]["coverage"][0] == "pass"

    for rank_out in outs:  # each rank read its own half: the box, not the tensors
        cost = rank_out["cost"]  # plus torch.save's framing of each stored chunk (~1.5 KiB)
        assert cost["box"] * 2 == cost["whole"], cost
        assert cost["box"] <= cost["storage"] <= cost["box"] + 2048 * cost["boxes"], cost


def other_shardings(path: str, root: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    root_dir = Path(root)
    for setup in ("fsdp1", "fsdp2"):
        model, _ = build(path, setup)
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=root_dir / setup)
    replica = load_on_rank0(path, rank=0)  # every rank holds the whole model
    dcp.save({"model": replica.state_dict()}, checkpoint_id=root_dir / "replicas")
    dist.barrier()
    key = "model.layers.0.mlp.up_proj.weight"
    chunks = {name: [len(reader.metadata.state_dict_metadata[reader.fqn(key)].chunks),
                     len(reader.chunk_files(key))]
              for name in ("fsdp1", "replicas") for reader in [DcpCheckpoint(root_dir / name)]}
    fsdp2, _ = build(path, "fsdp2")
    flat, _ = build(path, "fsdp1-flat")  # flat ranges: row boxes across chunk boundaries
    return {
        "chunks": chunks,
        "fsdp2 vs fsdp1": _verdicts(smpcheck.verify(
            fsdp2, checkpoint=str(root_dir / "fsdp1"), checks=CHECKS)),
        "fsdp2 vs replicas": _verdicts(smpcheck.verify(
            fsdp2, checkpoint=str(root_dir / "replicas"), checks=CHECKS)),
        "fsdp1-flat vs fsdp2": _verdicts(smpcheck.verify(
            flat, checkpoint=str(root_dir / "fsdp2"), checks=CHECKS)),
        "replica cost": _box_cost(fsdp2, root_dir / "replicas"),
    }


def test_dcp_saved_under_another_sharding_compares_exactly(ranks, checkpoints, tmp_path) -> None:
    path = str(checkpoints["llama-gqa-untied"])
    outs = ranks(other_shardings, 2, args=(path, str(tmp_path / "dcp")), timeout=240)
    out = outs[0]
    assert out["chunks"] == {"fsdp1": [2, 2], "replicas": [1, 1]}, out["chunks"]
    for name in ("fsdp2 vs fsdp1", "fsdp2 vs replicas", "fsdp1-flat vs fsdp2"):
        assert out[name]["ok"], (name, out[name])
        assert out[name]["checkpoint_parity"][0] == "pass", (name, out[name])
        assert out[name]["coverage"][0] == "pass", (name, out[name])
    for rank_out in outs:  # one chunk per tensor: DCP deserialises it whole for each box
        cost = rank_out["replica cost"]
        assert cost["box"] * 2 == cost["whole"] and cost["storage"] > cost["whole"], cost
