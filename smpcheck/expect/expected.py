"""Every tensor's expected value, where it comes from, and one pass that compares each piece a
rank holds with the bytes of the checkpoint that piece should hold.

Sources, stated in the report for every tensor:

* ``checkpoint``: one checkpoint tensor, found through the model's own key renames and PEFT's
  names (``base_model.model.``, ``.base_layer.``, ``modules_to_save`` copies), tie partners
  included;
* ``fused``: several checkpoint tensors that transformers fuses on load (MoE experts);
* ``adapter file``: a PEFT adapter loaded from a directory (``verify(adapter=DIR)``);
* ``fresh init``: tensors no checkpoint holds by design (a new task head when the checkpoint
  was saved from another architecture, PEFT adapters): judged by ``fresh_init`` against the
  rule that initialises them;
* ``config``: non-persistent buffers (rotary ``inv_freq``), recomputed by ``initialised``;
* ``missing``: none of the above, an error.

The comparison pass reads, for each piece, exactly the elements its
:class:`~smpcheck.shards.selection.Selection` names (safetensors slices), casts only those, and
keeps the verdict for ``checkpoint_parity`` and ``tp_shards`` alike. A full tensor is read only to
explain a mismatch (which slice the rank holds instead). Replicas are split between the ranks
that hold them when ``rank_parity`` runs too: one replica per group is compared with the files,
and rank parity proves the others equal it, so N replicas on a node read the checkpoint once.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from smpcheck.checkpoint import Checkpoint, CheckpointError
from smpcheck.checkpoint.dcp import open_checkpoint
from smpcheck.expect.fused import FusedMap, build_expected, fused_targets
from smpcheck.expect.peft_names import ADAPTER as ADAPTER_ROLE
from smpcheck.expect.peft_names import PeftView
from smpcheck.expect.skeleton import buffers_of, model_class, skeleton
from smpcheck.expect.vocab import VocabResize, kept_mask, kept_rows_reader, vocab_resize
from smpcheck.shards.pieces import Piece, splits
from smpcheck.shards.selection import Box
from smpcheck.shards.tensors import describe_diff, tie_groups

CHECKPOINT = "checkpoint"
FUSED = "fused"
ADAPTER = "adapter file"
FRESH = "fresh init"
CONFIG = "config"
MISSING = "missing"
COMPARED_WITH_FILES = (CHECKPOINT, ADAPTER, FUSED)


@dataclass(frozen=True)
class Source:
    """Where one tensor's expected value comes from."""

    kind: str
    keys: tuple[str, ...] = ()
    note: str = ""
    rows: int | None = None  # a resized vocabulary: only rows [0:rows) are the file's

    def words(self) -> str:
        keys = f" {self.keys[0]!r}" if len(self.keys) == 1 else (
            f" ({len(self.keys)} keys)" if self.keys else "")
        return f"{self.kind}{keys}{f': {self.note}' if self.note else ''}"


@dataclass
class Comparison:
    """One piece against the bytes it should hold."""

    name: str
    where: str
    source: Source
    equal: bool
    sharded: bool  # a DTensor shard that splits the tensor (TP or FSDP2)
    cast: str = ""  # "bfloat16 -> float32" when the file's dtype differs
    want: str = ""
    seen: str = ""
    detail: str = ""
    diagnosis: str = ""  # for a wrong shard: which slice it holds instead


class Expectations:
    """What every tensor of one rank's model should hold, computed once per ``verify``."""

    def __init__(self, view: PeftView, checkpoint: Path | None, adapter: Path | None,
                 world_size: int, rank: int, split_replicas: bool,
                 adapter_complete: bool = False) -> None:
        self.view = view
        self.world_size, self.rank = world_size, rank
        self.split_replicas = split_replicas
        self.fresh_model = skeleton(self.view.base)
        self.checkpoint = open_checkpoint(checkpoint, self.fresh_model or self.view.base) \
            if checkpoint is not None else None
        self.fused = fused_targets(self.fresh_model or self.view.base, {
            key: self.checkpoint.shape(key) for key in self.checkpoint.files
        }) if self.checkpoint is not None else FusedMap()
        self.adapter = Checkpoint(_adapter_file(adapter)) if adapter is not None else None
        self.adapter_complete = adapter_complete  # a save: every adapter must be in its file
        self.base_prefix = getattr(self.view.base, "base_model_prefix", "") + "."
        self.buffers = set(buffers_of(self.fresh_model))
        self.used: set[str] = set()  # checkpoint keys some piece of this rank stands for
        self.casts: set[str] = set()

    # -- sources -----------------------------------------------------------------------------
    @cached_property
    def _partners(self) -> dict[str, list[str]]:
        groups = tie_groups(self.fresh_model) if self.fresh_model is not None else []
        return {name: [n for n, _, _ in g if n != name] for g in groups for name, _, _ in g}

    @cached_property
    def _saved_config(self) -> dict[str, Any]:
        """The checkpoint's ``config.json`` ({} when there is none or it does not parse)."""
        if self.checkpoint is None:
            return {}
        try:
            folder = self.checkpoint.path
            folder = folder if folder.is_dir() else folder.parent  # one .safetensors file
            saved = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    @cached_property
    def head_is_new(self) -> bool:
        """The checkpoint was saved from another architecture (a causal LM loaded as a
        classifier): tensors outside the base model are expected fresh, not missing."""
        saved = self._saved_config.get("architectures") or []
        cls = model_class(self.view.base)
        return bool(saved) and cls is not None and cls.__name__ not in saved

    @cached_property
    def resize(self) -> VocabResize | None:
        """The vocabulary resize between ``config.json`` and the running config, if any."""
        config = getattr(self.view.base, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            return None
        return vocab_resize(self._saved_config, config.to_dict())

    @cached_property
    def _config_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape as the running config builds it (the skeleton's, on meta)."""
        if self.fresh_model is None:
            return {}
        return {name: tuple(t.shape) for name, t in self.fresh_model.state_dict().items()}

    def _config_shape(self, base_name: str) -> tuple[int, ...] | None:
        return self._config_shapes.get(base_name)

    def _outside_base_model(self, base_name: str) -> bool:
        prefix = self.base_prefix.rstrip(".")
        return bool(prefix) and hasattr(self.view.base, prefix) and not base_name.startswith(
            self.base_prefix)

    def key_for(self, base_name: str) -> str | None:
        """The checkpoint key of a base-model tensor, through renames and tie partners."""
        if self.checkpoint is None:
            return None
        for name in (base_name, *self._partners.get(base_name, [])):
            key = self.checkpoint.key_for(name, self.base_prefix)
            if key is not None:
                return key
        return None

    def source(self, piece: Piece) -> Source:
        """Where ``piece``'s expected value comes from."""
        base_name, role = self.view.base_name(piece.name)
        if not piece.persistent or base_name in self.buffers:
            return Source(CONFIG, note="recomputed from the config by initialised")
        if role == ADAPTER_ROLE:
            if self.adapter is not None and base_name in self.adapter.files:
                return Source(ADAPTER, (base_name,))
            if self.adapter_complete and self.adapter is not None:
                return Source(MISSING, note=f"not in the adapter file {self.adapter.path} "
                              "that was written from this model")
            return Source(FRESH, note="PEFT adapter")
        key = self.key_for(base_name)
        if self.checkpoint is not None and key is not None:
            stored = tuple(self.checkpoint.shape(key))
            if self.resize is not None and self.resize.covers(stored, piece.full_shape):
                return Source(CHECKPOINT, (key,), self.resize.words(), self.resize.kept)
            if (stored != piece.full_shape and self._outside_base_model(base_name)
                    and self._config_shape(base_name) in (None, piece.full_shape)):
                return Source(FRESH, note=f"re-initialised head (checkpoint's is {stored})")
            return Source(CHECKPOINT, (key,))
        target = self.fused.targets.get(base_name)
        if target is not None:
            ops = "+".join(type(op).__name__ for op in target.operations)
            return Source(FUSED, target.keys, f"built by {ops} as on load")
        if base_name in self.fused.unsupported:
            return Source(FUSED, note=self.fused.unsupported[base_name])
        if self.checkpoint is None:
            return Source(MISSING, note="no checkpoint given")
        if self.head_is_new and self._outside_base_model(base_name):
            return Source(FRESH, note=f"new head of {type(self.view.base).__name__}")
        return Source(MISSING, note="in the model but not in the checkpoint")

    # -- the comparison pass -------------------------------------------------------------------
    def _mine_to_compare(self, piece: Piece) -> bool:
        """Whether this rank compares ``piece`` with the files (one replica per group)."""
        if not self.split_replicas:
            return True
        size, index = _replica_group(piece, self.world_size, self.rank)
        return zlib.crc32(piece.name.encode()) % size == index

    def compare(self, piece: Piece, source: Source) -> Comparison | None:
        """``piece`` against its file, reading only its selection; None when this rank
        leaves the piece to another replica or the source is not a file."""
        if (source.kind not in COMPARED_WITH_FILES or not source.keys
                or not self._mine_to_compare(piece)):
            return None
        read = self._reader(piece, source)
        sharded = any(splits(p) for p in piece.placements)
        if piece.data.is_meta:
            return Comparison(piece.name, piece.where(), source, False, sharded,
                              want="values", seen="meta", detail="on the meta device")
        data = piece.data
        if source.rows is not None:  # a resized vocabulary: the file's rows only
            read = kept_rows_reader(read, source.rows)
        expected = piece.selection.assemble(read)
        if source.rows is not None and expected.shape == data.shape:
            kept = kept_mask(piece.selection, source.rows).to(data.device)
            data, expected = data[kept], expected[kept.to(expected.device)]
        cast = ""
        if expected.dtype != data.dtype:
            cast = f"{_dtype(expected.dtype)} -> {_dtype(data.dtype)}"
            expected = expected.to(data.dtype)
        expected = expected.to(data.device)
        equal = expected.shape == data.shape and torch.equal(data, expected)
        out = Comparison(piece.name, piece.where(), source, equal, sharded, cast)
        if not equal:
            out.want, out.seen, out.detail = describe_diff(data, expected)
            if sharded and source.rows is None:
                out.diagnosis = diagnose_shard(piece, read(None).to(piece.data.dtype))
        return out

    def _reader(self, piece: Piece, source: Source) -> Callable[[Box | None], torch.Tensor]:
        """Reads a box (None: all) of ``piece``'s expected tensor from its files."""
        if source.kind == FUSED:
            target = self.fused.targets[self.view.base_name(piece.name)[0]]
            return lambda box: build_expected(target, self.checkpoint.read, box)
        reader = self.checkpoint if source.kind == CHECKPOINT else self.adapter
        return lambda box: reader.read(source.keys[0], box)

    def run(self, pieces: list[Piece]) -> tuple[list[tuple[Piece, Source]], list[Comparison]]:
        """Every piece's source, and the comparisons this rank made (the one pass)."""
        sources, comparisons = [], []
        for piece in pieces:
            source = self.source(piece)
            sources.append((piece, source))
            self.used.update(source.keys if source.kind in (CHECKPOINT, FUSED) else ())
            comparison = self.compare(piece, source)
            if comparison is not None:
                comparisons.append(comparison)
                if comparison.cast:
                    self.casts.add(comparison.cast)
        return sources, comparisons

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in (self.checkpoint, self.adapter) if r is not None)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _adapter_file(adapter: Path) -> Path:
    path = Path(adapter)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"no adapter_model.safetensors in {path}: pass the directory "
                              "PeftModel.save_pretrained wrote")
    return file


def _replica_group(piece: Piece, world_size: int, rank: int) -> tuple[int, int]:
    """(how many ranks hold the same data as ``piece``, this rank's index among them)."""
    if piece.kind == "flat":  # an FSDP1 range: this rank's own
        return 1, 0
    if piece.mesh is None:  # a plain tensor: every rank of the group holds one
        return world_size, rank
    coords = piece.mesh.get_coordinate() or ()
    size, index = 1, 0
    for dim, placement in enumerate(piece.placements):
        if not splits(placement):
            index = index * piece.mesh.size(dim) + coords[dim]
            size *= piece.mesh.size(dim)
    return size, index


def diagnose_shard(piece: Piece, full: torch.Tensor) -> str:
    """Which slice of ``full`` a wrong shard holds instead, in words (1-D meshes)."""
    shards = [(d, p) for d, p in enumerate(piece.placements) if splits(p)]
    if len(shards) != 1 or piece.mesh.ndim != 1 or piece.flat_range is not None:
        return ""
    mesh_dim, placement = shards[0]
    dim, parts = placement.dim % full.dim(), piece.mesh.size(mesh_dim)
    index = piece.mesh.get_coordinate()[mesh_dim]
    data = piece.data.to(full.device)
    strided = getattr(placement, "split_factor", None) is not None
    for j, chunk in enumerate(full.chunk(parts, dim=dim)):
        if chunk.shape == data.shape and torch.equal(chunk, data):
            if strided:
                return (f"it holds contiguous chunk {j} of {parts}: its placement splits each "
                        "packed block, but the weight was split as one block")
            return (f"it holds the slice of TP rank {j} (chunk {j} of {parts} along dim {dim}), "
                    f"not rank {index}'s: a wrong shard offset")
    for blocks in (2, 3):
        if full.shape[dim] % (blocks * parts) == 0 and not strided:
            per_block = [b.chunk(parts, dim=dim)[index] for b in full.chunk(blocks, dim=dim)]
            if torch.equal(torch.cat(per_block, dim=dim), data):
                return (f"it holds a per-block split ({blocks} packed blocks) of a weight whose "
                        "placement says one contiguous block")
    return "it matches no slice of the full tensor (garbage, or another tensor's values)"
