"""Read a torch.distributed.checkpoint (DCP) directory lazily, one box of a tensor at a time.

A DCP directory holds ``.metadata`` (every tensor's global shape, dtype and stored chunks) and
the ``*.distcp`` files the ranks wrote, as ``torch.distributed.checkpoint.save`` leaves them;
the HF Trainer and accelerate write one inside a checkpoint folder
(``checkpoint-N/pytorch_model_fsdp_0/``), their keys under a ``model.`` level because they save
``{"model": state_dict}``. :class:`DcpCheckpoint` answers what
:class:`~smpcheck.checkpoint.Checkpoint` answers for safetensors, so a DCP directory can stand
behind ``verify(model, checkpoint=DIR)``.

Everything is DCP's own machinery, never a reading of its format: ``FileSystemReader`` reads
the metadata and the data, ``create_read_items_for_chunk_list`` (the resharding DCP itself
loads with) turns one box into reads of the stored chunks it overlaps, and a small
``DefaultLoadPlanner`` subclass hands DCP the box's destination. No process group is
needed: each rank reads its own boxes, with no collective, as
``_load_state_dict(no_dist=True)`` does.

What a box costs: the returned tensor holds only the box (that is ``bytes_read``), but
DCP's ``FileSystemReader`` deserialises every stored chunk the box overlaps whole (one
``torch.load`` per chunk) before narrowing it, so the bytes taken from disk
(``storage_bytes_read``) are those chunks, each with torch.save's framing (about 1.5 KiB),
loaded again for every box that touches it (no cache across boxes). A checkpoint saved under
the sharding it is checked under reads each rank's own chunk, about the box; one saved whole
(plain replicas) reads the whole tensor for every box of it.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from smpcheck.checkpoint.reader import (
    FINGERPRINT_BLOCK,
    FINGERPRINT_SAMPLES,
    Checkpoint,
    CheckpointError,
    hash_samples,
    key_in,
    model_names,
    size_by_unit,
    state_dict_names,
)
from smpcheck.memory import ModelSize
from smpcheck.shards.selection import Box

METADATA = ".metadata"
TRAINER_FOLDER = "pytorch_model_fsdp_0"  # accelerate's FSDP_MODEL_NAME, model index 0
MODEL_LEVEL = "model"  # accelerate and the Trainer save {"model": state_dict}
OPTIMIZER_LEVELS = ("optim", "optimizer", "optimizers")


def dcp_folder(path: str | Path) -> Path | None:
    """The folder holding the DCP ``.metadata`` for ``path`` (None: not a DCP checkpoint).

    ``path`` itself when it holds ``.metadata`` or ``*.distcp`` files (the latter so that a
    lost ``.metadata`` is named as such, not as a missing safetensors file), else its
    ``pytorch_model_fsdp_0`` subfolder when that is one (a Trainer ``checkpoint-N``).
    """
    path = Path(path)
    for folder in (path, path / TRAINER_FOLDER):
        if folder.is_dir() and ((folder / METADATA).exists() or any(folder.glob("*.distcp"))):
            return folder
    return None


def open_checkpoint(path: str | Path, model: nn.Module | None = None) -> Checkpoint | DcpCheckpoint:
    """The reader for ``path``: a :class:`DcpCheckpoint` for a DCP directory (or a Trainer
    checkpoint folder holding one), a safetensors :class:`Checkpoint` otherwise."""
    if dcp_folder(path) is not None:
        return DcpCheckpoint(path, model)
    return Checkpoint(path, model)


class _BoxPlanner(DefaultLoadPlanner):
    """Hands DCP's reader the destination of one box: every read item resolves, through
    DCP's own ``transform_tensor`` (its narrowing by the item's offsets and lengths), to a
    view of ``dest``, the box's tensor; ``commit_tensor`` stays DCP's no-op since the data
    is already in place. Plans are made by :meth:`DcpCheckpoint.read`, not by this planner."""

    def __init__(self, dest: torch.Tensor) -> None:
        super().__init__()
        self.dest = dest

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.dest

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise CheckpointError(f"{read_item.storage_index.fqn} is stored as bytes, not a tensor")


class DcpCheckpoint:
    """A lazily read DCP checkpoint, keyed by the names its state dict was saved under.

    ``files`` maps each model tensor's key (the saved state-dict name, without the
    ``model.`` level the Trainer adds) to the first ``.distcp`` file holding it
    (:meth:`chunk_files` lists all); optimizer state is kept apart in ``optimizer_keys``
    and non-tensor entries are left out. ``path`` is the folder given (a Trainer
    ``checkpoint-N`` keeps its ``config.json`` there), ``folder`` the one with ``.metadata``.
    """

    def __init__(self, path: str | Path, model: nn.Module | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"DCP checkpoint {self.path} is not a directory")
        self.folder = dcp_folder(self.path) or self.path
        self.metadata = _read_metadata(self.folder)
        self._storage_sizes = _check_files(self.folder, self.metadata)
        self._reader = FileSystemReader(self.folder)
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=False)
        self.bytes_read = 0  # the boxes read() returned, as stored: the cost of checking
        self.storage_bytes_read = 0  # the stored chunks DCP deserialised to cut those boxes
        self.fingerprint_bytes = 0  # what fingerprint() read
        self.fused_keys: list[str] = []  # a live model's state dict holds fused tensors as such
        tensors = {fqn: md for fqn, md in self.metadata.state_dict_metadata.items()
                   if isinstance(md, TensorStorageMetadata)}
        paths = self.metadata.planner_data if isinstance(self.metadata.planner_data, dict) \
            else {}
        optimizer = {fqn for fqn in tensors if _path(fqn, paths)[0] in OPTIMIZER_LEVELS}
        self.optimizer_keys = sorted(optimizer)  # for later use: not model tensors
        model_fqns = [fqn for fqn in tensors if fqn not in optimizer]
        level = _model_level(model_fqns, paths, model)
        self._fqn = {fqn[len(level):]: fqn for fqn in model_fqns}
        self._tensors = {key: tensors[fqn] for key, fqn in self._fqn.items()}
        self.files = {key: next(iter(self.chunk_files(key)), self.folder / METADATA)
                      for key in self._fqn}
        self.by_model_name = _by_model_name(list(self.files), model)

    # -- what Checkpoint answers -----------------------------------------------------------------
    @cached_property
    def dtypes(self) -> dict[str, str]:
        """Checkpoint key -> dtype name as stored (``float32``)."""
        return {key: str(md.properties.dtype).removeprefix("torch.")
                for key, md in self._tensors.items()}

    def key_for(self, name: str, prefix: str = "") -> str | None:
        """The checkpoint key holding model tensor ``name`` (trying the base-model prefix)."""
        return key_in(self.by_model_name, name, prefix)

    def shape(self, key: str) -> list[int]:
        """A tensor's global shape, from ``.metadata`` (nothing read)."""
        return list(self._tensors[key].size)

    def is_fused_target(self, name: str) -> bool:
        """Always False: a state dict saved from a live model holds its fused tensors whole."""
        return False

    def fqn(self, key: str) -> str:
        """The key as ``.metadata`` names it (``model.`` level included)."""
        return self._fqn[key]

    def chunk_files(self, key: str) -> list[Path]:
        """Every ``.distcp`` file holding a chunk of ``key``, in chunk order."""
        fqn, md = self._fqn[key], self._tensors[key]
        out = []
        for index, chunk in enumerate(md.chunks):
            info = self.metadata.storage_data.get(_index(fqn, chunk, index))
            if info is not None and self.folder / info.relative_path not in out:
                out.append(self.folder / info.relative_path)
        return out

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        """One tensor, or one box of it (a ``[start, stop)`` run per dimension).

        The box is one destination chunk for DCP's resharding: it becomes one read item per
        stored chunk it overlaps, executed by ``FileSystemReader.read_data`` straight into the
        box's tensor. ``bytes_read`` counts the box; ``storage_bytes_read`` the whole stored
        chunks DCP deserialised to cut it (see the module docstring).
        """
        md, fqn = self._tensors[key], self._fqn[key]
        shape = list(md.size)
        box = tuple((0, n) for n in shape) if box is None else tuple(box)
        if len(box) != len(shape) or any(not 0 <= a <= b <= n for (a, b), n in zip(box, shape)):
            raise CheckpointError(f"cannot read box {box} of {key}: {self.folder / METADATA} "
                                  f"stores it with shape {shape}")
        out = torch.empty([b - a for a, b in box], dtype=md.properties.dtype)
        if out.numel():
            want = ChunkStorageMetadata(torch.Size([a for a, _ in box]), torch.Size(out.shape))
            items = create_read_items_for_chunk_list(fqn, md, [want])
            covered = sum(math.prod(item.lengths) for item in items)
            if covered != out.numel():
                raise CheckpointError(f"{self.folder / METADATA} stores only {covered} of the "
                                      f"{out.numel()} elements of {key}{list(box)}: a partial "
                                      "save (a rank's chunks are missing)")
            infos = [self.metadata.storage_data[item.storage_index] for item in items]
            try:
                self._reader.read_data(LoadPlan(items), _BoxPlanner(out)).wait()
            except Exception as exc:  # torch.load and the file system raise their own types
                files = sorted({str(self.folder / info.relative_path) for info in infos})
                raise CheckpointError(f"cannot read {key} from {', '.join(files)}: "
                                      f"{_one_line(exc)}") from exc
            self.storage_bytes_read += sum(info.length for info in infos)
        self.bytes_read += out.numel() * out.element_size()
        return out

    def fingerprint(self, samples: int = FINGERPRINT_SAMPLES,
                    block: int = FINGERPRINT_BLOCK) -> str:
        """A digest of what these files hold, cheap on any size: ``.metadata`` whole (it is
        the header: shapes, dtypes, where every chunk lies), every ``.distcp`` file's name and
        size, and ``samples`` blocks of ``block`` bytes at the same offsets of the data
        wherever it runs, as :meth:`Checkpoint.fingerprint` samples safetensors. What it read
        is counted in ``fingerprint_bytes``."""
        hasher = xxhash.xxh3_128()
        header = (self.folder / METADATA).read_bytes()
        hasher.update(f"{METADATA}|{len(header)}|".encode() + header)
        self.fingerprint_bytes += len(header)
        self.fingerprint_bytes += hash_samples(
            hasher, [self.folder / f for f in sorted(self._storage_sizes)], samples, block)
        return hasher.hexdigest()

    def sizes(self, dtype: torch.dtype | None = None) -> ModelSize:
        """Parameter bytes, largest tensor and largest FSDP unit (a numbered layer, or all
        that is outside the layers), from ``.metadata`` alone (as ``dtype`` when given)."""
        return size_by_unit((key, math.prod(md.size) * (dtype or md.properties.dtype).itemsize)
                            for key, md in self._tensors.items())


def _read_metadata(folder: Path) -> Metadata:
    file = folder / METADATA
    if not file.exists():
        raise CheckpointError(f"{file} does not exist: a torch.distributed.checkpoint directory "
                              "needs the .metadata that dcp.save writes last (was the save cut "
                              "short?)")
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as exc:  # pickle raises many types on a broken file
        raise CheckpointError(f"{file} is not readable torch.distributed.checkpoint metadata "
                              f"({_one_line(exc)})") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file} is not torch.distributed.checkpoint metadata (it holds "
                              f"{type(metadata).__name__} without storage data)")
    return metadata


def _check_files(folder: Path, metadata: Metadata) -> dict[str, int]:
    """Every ``.distcp`` file ``.metadata`` names exists and holds the bytes it places there
    (file stats only): a missing or truncated file is one sentence now, not a failed read
    mid-check. Returns each file's needed size."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = folder / name
        if not file.exists():
            raise CheckpointError(f"{file} does not exist, but {folder / METADATA} places "
                                  "checkpoint data in it: copy the whole checkpoint directory")
        actual = file.stat().st_size
        if actual < size:
            raise CheckpointError(f"{file} is truncated: it holds {actual} bytes, but "
                                  f"{folder / METADATA} places data up to byte {size}")
    return needed


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception: torch.load's own explain over many lines."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _index(fqn: str, chunk: ChunkStorageMetadata, index: int) -> MetadataIndex:
    return MetadataIndex(fqn, chunk.offsets, index)


def _path(fqn: str, paths: dict[str, Any]) -> tuple[str, ...]:
    """Where ``fqn`` sat in the nested state dict that was saved (from DCP's planner data;
    split at the first dot when the checkpoint has none)."""
    path = paths.get(fqn)
    if isinstance(path, tuple) and path and all(isinstance(p, str) for p in path):
        return path
    return tuple(fqn.split(".", 1))


def _model_level(fqns: list[str], paths: dict[str, Any], model: nn.Module | None) -> str:
    """``"model."`` when every tensor was saved under a ``model`` level (accelerate's and the
    Trainer's ``{"model": state_dict}``), else ``""``.

    DCP's planner data says how the state dict was nested, so a bare state dict whose names
    all start with ``model.`` (a partial save without ``lm_head``) keeps them. Without planner
    data the model decides: strip only when that makes more keys its names.
    """
    prefix = MODEL_LEVEL + "."
    if not fqns or not all(fqn.startswith(prefix) for fqn in fqns):
        return ""
    if all(fqn in paths for fqn in fqns):
        return prefix if all(len(_path(f, paths)) > 1 and _path(f, paths)[0] == MODEL_LEVEL
                             for f in fqns) else ""
    if model is None:
        return ""
    names = set(state_dict_names(model))
    stripped = sum(fqn[len(prefix):] in names for fqn in fqns)
    return prefix if stripped > sum(fqn in names for fqn in fqns) else ""


def _by_model_name(keys: list[str], model: nn.Module | None) -> dict[str, str]:
    """Model name -> key. A key that is already one of the model's state-dict names (a state
    dict saved from the live model) stands for itself; the others go through transformers'
    own renames (:func:`~smpcheck.checkpoint.model_names`), fused ones left unmapped."""
    own = set(state_dict_names(model)) if model is not None else set(keys)
    out = {key: key for key in keys if key in own}
    rest = [key for key in keys if key not in own]
    if rest:
        names, fused = model_names(rest, model)
        out.update({names[key]: key for key in rest if key not in fused
                    and names[key] not in out})
    return out
