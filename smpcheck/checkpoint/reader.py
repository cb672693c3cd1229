"""Read a safetensors checkpoint lazily, one tensor at a time, under the model's own names.

A checkpoint is a directory with ``model.safetensors`` or a sharded set with
``model.safetensors.index.json`` (or a single ``.safetensors`` file). Files are memory-mapped
by ``safe_open``; a tensor is read only when asked for, so checking a 70B checkpoint holds one
tensor at a time.

Checkpoint keys are not always the model's names: transformers 5 renames some on load
(GPT-NeoX ``embed_out`` -> ``lm_head``) and fuses others (Mixtral's per-expert ``w1``/``w3``
into ``gate_up_proj``). Which model name a key loads into is decided by transformers' own
``rename_source_key`` over the model's own conversion mapping (:func:`model_names`), never a
copy of its rules; fused keys are left to :mod:`smpcheck.expect.fused`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from torch import nn

from smpcheck.memory import ModelSize

_STORED_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
                 "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
FINGERPRINT_SAMPLES = 64  # blocks read per rank to tell two copies of a checkpoint apart
FINGERPRINT_BLOCK = 1 << 16
_LAYER = re.compile(r"\.(layers|layer|h|blocks)\.\d+\.")


class CheckpointError(ValueError):
    """The checkpoint cannot be read: missing files, a broken index, a corrupt header."""


def _files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> file holding it."""
    if path.is_file():
        return {key: path for key in _keys_of(path)}
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(f"{index} names files that do not exist: {missing}")
        return {key: path / f for key, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        return {key: single for key in _keys_of(single)}
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def file_identities(path: str | Path) -> dict[str, tuple[int, int, int]]:
    """``{file name: (size, mtime_ns, inode)}`` of a checkpoint's files: what changes when a
    file is truncated, rewritten, replaced by a rename or deleted, at the cost of a ``stat``."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    identities = {}
    for file in files:
        st = file.stat()
        identities[file.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return identities


def changed_files(before: dict[str, tuple[int, int, int]],
                  path: str | Path) -> list[tuple[str, str]]:
    """How the checkpoint at ``path`` differs from ``before``: ``(file, what happened)``."""
    try:
        after = file_identities(path)
    except OSError:
        return [(str(path), "is gone")]
    changes = []
    for name, (size, mtime, inode) in before.items():
        now = after.get(name)
        if now is None:
            changes.append((name, "is gone"))
        elif now[2] != inode:
            changes.append((name, "was replaced (another file now has its name)"))
        elif now[0] != size:
            changes.append((name, f"changed size from {size} to {now[0]} bytes"))
        elif now[1] != mtime:
            changes.append((name, "was rewritten"))
    return changes


def _keys_of(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc


def _legacy_names(keys: list[str], model: nn.Module) -> dict[str, str]:
    """transformers 4.x: the class's ``_checkpoint_conversion_mapping`` regexes, applied as
    transformers 4 itself applies them (``re.sub`` per pattern, in order)."""
    renames = list((getattr(model, "_checkpoint_conversion_mapping", None) or {}).items())
    out = {}
    for key in keys:
        name = key
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        out[key] = name
    return out


def model_names(keys: list[str], model: nn.Module | None) -> tuple[dict[str, str], set[str]]:
    """(checkpoint key -> the model name ``from_pretrained`` loads it into, keys fused on load).

    transformers 5's own loading code decides, not a copy of it: the model's conversion
    mapping (``get_model_conversion_mapping``, scoped per sub-model, renames and converters
    in order) applied to each key by ``rename_source_key`` with the base-model prefix and the
    model's meta state dict, keys in the natural order that ``from_pretrained`` walks them
    (some renames keep state across keys), with its fallback to the key itself. A key a
    converter consumes is fused: its expected value is built by :mod:`smpcheck.expect.fused`.
    """
    if model is None:
        return {key: key for key in keys}, set()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers 4.x
        return _legacy_names(keys, model), set()
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model without a mapping simply has no renames
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    meta = dict.fromkeys(state_dict_names(model), True)
    names, fused = {}, set()
    for key in sorted(keys, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, pattern = rename_source_key(key, [], [], prefix, meta)
        if pattern is not None:
            fused.add(key)
        names[key] = name
    return names, fused


def state_dict_names(model: nn.Module) -> list[str]:
    """The names ``model.state_dict()`` would have, without calling it (a wrapped model's
    state dict may be a collective): parameters and persistent buffers, ties included."""
    out = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        out += [prefix + n for n, p in module._parameters.items() if p is not None]
        out += [prefix + n for n, b in module._buffers.items()
                if b is not None and n not in module._non_persistent_buffers_set]
    return list(dict.fromkeys(out))


def key_in(by_model_name: dict[str, str], name: str, prefix: str = "") -> str | None:
    """The checkpoint key holding model tensor ``name``, trying it with and without the
    base-model ``prefix`` (a head class's names against a base model's checkpoint)."""
    for candidate in (name, name.removeprefix(prefix), prefix + name):
        if candidate in by_model_name:
            return by_model_name[candidate]
    return None


def size_by_unit(tensors: Iterable[tuple[str, int]]) -> ModelSize:
    """Parameter bytes, largest tensor and largest FSDP unit (a numbered layer, or all that
    is outside the layers) of ``(key, bytes)`` pairs."""
    units: dict[str, int] = {}
    largest = 0
    for key, nbytes in tensors:
        largest = max(largest, nbytes)
        match = _LAYER.search(key)
        unit = match.group(0) if match else "outside the layers"
        units[unit] = units.get(unit, 0) + nbytes
    return ModelSize(sum(units.values()), largest, max(units.values(), default=0))


def hash_samples(hasher: Any, files: list[Path], samples: int, block: int,
                 header: Callable[[Any, int], bytes] | None = None) -> int:
    """Hash every file's name, size and ``header`` (read from its open handle), and
    ``samples`` blocks of ``block`` bytes at the same offsets of the data wherever it runs
    (small files: the blocks tile them whole). Returns the bytes read."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    block = min(block, -(-total // samples)) if total else 0
    offsets = [total * i // samples for i in range(samples)]
    start, read = 0, 0
    for file, size in zip(files, sizes):
        with open(file, "rb") as handle:
            head = header(handle, size) if header is not None else b""
            hasher.update(f"{file.name}|{size}|".encode() + head)
            read += len(head)
            for offset in (o - start for o in offsets if start <= o < start + size):
                handle.seek(offset)
                hasher.update(handle.read(block))
                read += block
        start += size
    return read


def _safetensors_header(handle: Any, size: int) -> bytes:
    return handle.read(8 + int.from_bytes(handle.read(8), "little")) if size >= 8 else b""


class Checkpoint:
    """A lazily read safetensors checkpoint, keyed by the model's parameter names."""

    def __init__(self, path: str | Path, model: nn.Module | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint {self.path} does not exist")
        self.files = _files(self.path)
        self._handles: dict[Path, Any] = {}
        self.bytes_read = 0  # what read() returned, as stored: the cost of checking
        self.fingerprint_bytes = 0  # what fingerprint() read
        names, fused = model_names(list(self.files), model)
        self.fused_keys = sorted(fused)
        self._fused_names = {names[key] for key in fused}
        self.by_model_name: dict[str, str] = {
            name: key for key, name in names.items() if key not in fused}

    @cached_property
    def dtypes(self) -> dict[str, str]:
        """Checkpoint key -> dtype name as stored."""
        out = {}
        for key, file in self.files.items():
            out[key] = str(self._handle(file).get_slice(key).get_dtype())
        return out

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def key_for(self, name: str, prefix: str = "") -> str | None:
        """The checkpoint key holding model tensor ``name`` (trying the base-model prefix)."""
        return key_in(self.by_model_name, name, prefix)

    def shape(self, key: str) -> list[int]:
        """A tensor's shape, from its file's header (nothing read)."""
        return list(self._handle(self.files[key]).get_slice(key).get_shape())

    def is_fused_target(self, name: str) -> bool:
        """True when the model builds ``name`` from several checkpoint tensors on load."""
        return name in self._fused_names

    def read(self, key: str, box: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        """One tensor, or one box of it (a ``[start, stop)`` run per dimension), read from
        its memory-mapped file now: a box reads only its own bytes."""
        try:
            handle = self._handle(self.files[key])
            if box is None:
                tensor = handle.get_tensor(key)
            elif not box:  # a 0-d tensor
                tensor = handle.get_slice(key)[...]
            else:
                tensor = handle.get_slice(key)[tuple(slice(a, b) for a, b in box)]
        except Exception as exc:
            raise CheckpointError(f"cannot read {key} from {self.files[key]}: {exc}") from exc
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def fingerprint(self, samples: int = FINGERPRINT_SAMPLES,
                    block: int = FINGERPRINT_BLOCK) -> str:
        """A digest of what these files hold, cheap on any size: every file's name, size and
        header, and ``samples`` blocks of ``block`` bytes at the same offsets of the data
        wherever it runs. Two hosts whose copies differ (a stale checkpoint on one node)
        get different fingerprints unless they differ only between the sampled blocks (a
        checkpoint smaller than the samples is hashed whole). What it read is counted in
        ``fingerprint_bytes``, apart from the comparisons' ``bytes_read``."""
        hasher = xxhash.xxh3_128()
        self.fingerprint_bytes += hash_samples(hasher, sorted(set(self.files.values())),
                                               samples, block, _safetensors_header)
        return hasher.hexdigest()

    def sizes(self, dtype: torch.dtype | None = None) -> ModelSize:
        """Parameter bytes, largest tensor and largest FSDP unit (a numbered layer, or all
        that is outside the layers), from the headers alone (as ``dtype`` when given)."""
        def stored(key: str, file: Path) -> int:
            piece = self._handle(file).get_slice(key)
            itemsize = dtype.itemsize if dtype is not None else _STORED_BYTES.get(
                piece.get_dtype(), 4)
            return math.prod(piece.get_shape()) * itemsize

        return size_by_unit((key, stored(key, file)) for key, file in self.files.items())
