"""Validate a model directory in the parent process, before any rank starts.

A broken input found by a rank ends in a launcher's error wall on every rank; found here, it is
one sentence naming the file and the key, and exit 2. Everything is read from small pieces of
the files (``config.json``, the index, each safetensors *header*), so a 100 GB checkpoint is
checked in well under a second plus the time to build its architecture on the meta device:

* ``config.json`` is JSON, names a ``model_type`` transformers knows, and loads as its config;
* every safetensors file has a readable header whose tensors tile the data section exactly,
  each with a known dtype and a byte length equal to its dtype's size x its shape (the rules
  ``safe_open`` enforces, so what passes here loads there);
* a sharded index is JSON, names only files that exist, every key it lists is in the file it
  names, every key of those files is listed, and no key is in two files;
* every checkpoint tensor that the model loads one-to-one (through the model's own renames)
  has the shape the config builds. Tensors the model fuses on load (MoE experts) and those the
  model lacks are left to the checks: a missing tensor is a data fault (exit 1, named).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smpcheck.checkpoint.source import UsageError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# Bits per element of every dtype safetensors writes; None: safetensors knows it, torch cannot
# hold it, so loading would fail.
DTYPE_BITS: dict[str, int | None] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": None, "F6_E3M2": None, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
    "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def validate(path: Path, model_class_for: Callable[[Any], type] | None = None) -> None:
    """Check the model directory ``path``; raise :class:`UsageError` at the first problem.

    Args:
        path: a directory with ``config.json`` and safetensors weights.
        model_class_for: config -> the model class the run will build (the strategy's own
            choice); the shape comparison is skipped without it.

    Raises:
        UsageError: one sentence naming the file, the key and the fix.
    """
    config = read_config(path / "config.json")
    headers = checkpoint_headers(path)
    if model_class_for is not None:
        check_shapes(path, config, headers, model_class_for)


# -- config ---------------------------------------------------------------------------------

def read_config(file: Path) -> Any:
    """The config ``from_pretrained`` would build from ``file``."""
    data = _read_json(file, "a model config")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{file} has no model_type: transformers cannot tell which "
                         "architecture it describes; add the model_type the model was saved with")
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        if "auto_map" in data:
            raise UsageError(f"{file}: model_type {model_type!r} is defined by the checkpoint's "
                             "own code (auto_map), and smpcheck runs without trust_remote_code; "
                             "use a model type transformers ships")
        raise UsageError(f"{file}: model_type {model_type!r} is not known to transformers "
                         f"{transformers.__version__}; fix the model_type or upgrade transformers")
    try:
        return AutoConfig.from_pretrained(file.parent)
    except Exception as exc:  # noqa: BLE001 - validators raise many types; all mean bad input
        raise UsageError(f"{file} does not load as a {model_type} config: "
                         f"{_first_line(exc)}") from exc


def _read_json(file: Path, what: str) -> dict:
    try:
        data = json.loads(file.read_bytes())
    except OSError as exc:
        raise UsageError(f"{file} cannot be read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UsageError(f"{file} is not valid JSON ({_first_line(exc)}): it should hold "
                         f"{what}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{file} holds a JSON {type(data).__name__}, not the object of "
                         f"{what}")
    return data


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # strict-dataclass errors put the reason on the second line
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines
                                                                          else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- safetensors ----------------------------------------------------------------------------

def checkpoint_headers(path: Path) -> dict[str, TensorHeader]:
    """Every checkpoint key and its header entry, from the index (if any) or the single file.

    Raises:
        UsageError: no weights, a broken index, or a file whose header is not readable.
    """
    index = path / INDEX
    if index.exists():
        return _indexed_headers(index)
    single = path / SINGLE
    if single.exists():
        return read_header(single)
    raise UsageError(f"no {SINGLE} or {INDEX} in {path}: smpcheck reads safetensors "
                     "checkpoints (save with save_pretrained(..., safe_serialization=True))")


def _indexed_headers(index: Path) -> dict[str, TensorHeader]:
    weight_map = _read_json(index, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UsageError(f"{index} has no weight_map of tensor name -> file name: rewrite it "
                         "with save_pretrained")
    files = {name: index.parent / name for name in sorted(set(weight_map.values()))}
    for name, file in files.items():
        if not file.is_file():
            key = next(k for k, v in weight_map.items() if v == name)
            raise UsageError(f"{index} puts {key} (and {_count(weight_map, name) - 1} more) in "
                             f"{name}, which does not exist in {index.parent}")
    seen: dict[str, TensorHeader] = {}
    for file in files.values():
        for key, header in read_header(file).items():
            if key in seen:
                raise UsageError(f"{key} is in both {seen[key].file.name} and {file.name}: a "
                                 "checkpoint holds each tensor once; remove the stale shard")
            seen[key] = header
    for key, name in weight_map.items():
        if key not in seen or seen[key].file.name != Path(name).name:
            where = f"it is in {seen[key].file.name}" if key in seen else "no shard holds it"
            raise UsageError(f"{index} puts {key} in {name}, but {where}: the index and the "
                             "shards disagree; rewrite the index or re-copy the shards")
    unlisted = sorted(set(seen) - set(weight_map))
    if unlisted:
        raise UsageError(f"{seen[unlisted[0]].file} holds {unlisted[0]}"
                         f"{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}, "
                         f"which {index.name} does not list: the index and the shards disagree; "
                         "rewrite the index or re-copy the shards")
    return seen


def _count(weight_map: dict[str, str], name: str) -> int:
    return sum(v == name for v in weight_map.values())


def read_header(file: Path) -> dict[str, TensorHeader]:
    """The tensors of one safetensors file, after checking its header as ``safe_open`` does.

    Raises:
        UsageError: the header is unreadable, or a tensor's dtype, shape or byte range is
            invalid or lies outside the file.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            raw = handle.read(n) if n is not None and n <= min(MAX_HEADER_BYTES, size) else b""
    except OSError as exc:
        raise UsageError(f"{file} cannot be read: {exc.strerror or exc}") from exc
    if n is None:
        raise UsageError(f"{file} is {size} bytes, too short for a safetensors header")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise UsageError(f"{file} declares a {n}-byte header but is {size} bytes long: not a "
                         "safetensors file, or truncated; re-copy it")
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise UsageError(f"{file} has an unreadable safetensors header ({_first_line(exc)}): "
                         "re-copy the file") from exc
    if not isinstance(header, dict):
        raise UsageError(f"{file} has a safetensors header that is not a JSON object")
    header.pop("__metadata__", None)
    tensors = {key: _entry(file, key, info) for key, info in header.items()}
    _check_layout(file, tensors, size - 8 - n)
    return {key: TensorHeader(file, dtype, shape) for key, (dtype, shape, _) in tensors.items()}


def _entry(file: Path, key: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (begin, end)) of one header entry, each field checked for its type."""
    if not isinstance(info, dict):
        raise UsageError(f"{file}: tensor {key} has no dtype/shape/data_offsets in its header")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise UsageError(f"{file}: tensor {key} has dtype {dtype!r}, which safetensors does not "
                         "know; the header is corrupt")
    if DTYPE_BITS[dtype] is None:
        raise UsageError(f"{file}: tensor {key} is stored as {dtype}, which torch cannot load")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise UsageError(f"{file}: tensor {key} has shape {shape!r}, not a list of sizes; the "
                         "header is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise UsageError(f"{file}: tensor {key} has data_offsets {offsets!r}, not [begin, end]; "
                         "the header is corrupt")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(file: Path, tensors: dict, data_bytes: int) -> None:
    """Tensors must tile the data section from byte 0 to its end, each as long as its dtype x
    its shape (safetensors refuses any gap, overlap or tail)."""
    end = 0
    for key, (dtype, shape, (begin, stop)) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if stop > data_bytes:
            raise UsageError(f"{file}: tensor {key} ends at byte {stop} of the data, but the file "
                             f"holds only {data_bytes} bytes of data: truncated; re-copy it")
        if begin != end or stop < begin:
            raise UsageError(f"{file}: tensor {key} starts at byte {begin} of the data where "
                             f"byte {end} was expected (overlapping or gapped offsets); the "
                             "header is corrupt")
        if bits % 8 or stop - begin != bits // 8:
            raise UsageError(f"{file}: tensor {key} is {dtype} of shape {list(shape)}, "
                             f"{bits / 8:g} bytes, but its data_offsets hold {stop - begin}; the "
                             "header is corrupt")
        end = stop
    if end != data_bytes:
        raise UsageError(f"{file} holds {data_bytes - end} bytes after its last tensor: not "
                         "what save_pretrained writes; re-copy the file")


# -- config against weights -----------------------------------------------------------------

def check_shapes(path: Path, config: Any, headers: dict[str, TensorHeader],
                 model_class_for: Callable[[Any], type]) -> None:
    """Every checkpoint tensor the model loads one-to-one has the shape the config builds."""
    if getattr(config, "quantization_config", None):
        return  # packed quantized weights have shapes of their own
    cls, model = _meta_model(path / "config.json", config, model_class_for)
    from smpcheck.checkpoint.reader import Checkpoint

    checkpoint = Checkpoint(path, model)
    prefix = getattr(model, "base_model_prefix", "") + "."
    wrong = []
    for name, tensor in model.state_dict().items():
        key = checkpoint.key_for(name, prefix)
        if key is None or checkpoint.is_fused_target(name) or key not in headers:
            continue
        if headers[key].shape != tuple(tensor.shape):
            wrong.append((key, name, headers[key], tuple(tensor.shape)))
    if wrong:
        key, name, header, built = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise UsageError(f"{header.file}: {key} has shape {list(header.shape)} but config.json "
                         f"builds {cls.__name__}.{name} as {list(built)}{more}: the config and "
                         "the weights disagree; use the config saved with these weights")


def _meta_model(file: Path, config: Any, model_class_for: Callable[[Any], type]) -> tuple:
    """The architecture with every tensor on the meta device and init skipped (a 70B model in
    a second); for a model whose constructor computes on values, the way the recipe builds
    it on non-zero ranks (parameters on meta, buffers real). Only a model neither can build
    is bad input: every rank would fail to build it too."""
    import torch
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    def on_meta() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.device("meta"))
        stack.enter_context(no_init_weights())
        return stack

    try:
        cls = model_class_for(config)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{file}: transformers has no model class for it: "
                         f"{_first_line(exc)}") from exc
    for build in (on_meta, init_empty_weights):
        try:
            with build():
                return cls, cls._from_config(config)
        except Exception as exc:  # noqa: BLE001 - a bad config fails in the model's own code
            error = exc
    raise UsageError(f"{file}: transformers cannot build {cls.__name__} from it: "
                     f"{_first_line(error)}") from error
