"""Fuzz ``smpcheck run`` with corrupted checkpoints and configs, through the console script.

Whatever the corruption (a truncated or garbled safetensors file, a header whose dtype, shape
or offsets lie, an index that names the wrong shard or a missing one, a config whose sizes or
type are wrong, a NaN in a tensor), the run ends one of three ways, and never in a traceback:

* exit 2, one sentence naming the file, from the parent before any rank starts (fast);
* exit 1, one sentence naming a tensor, with the report written;
* exit 0, when the corruption changed nothing the model depends on (a harmless config field).

and no process outlives it. CI runs a handful of fixed examples; more by hand:

    SMPCHECK_FUZZ=deep pytest tests/test_fuzz_inputs.py -n 0 --hypothesis-show-statistics
    # 60 random examples, NaN and every config size too
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.console import one_sentence, run_cli
from tests.models import FAMILIES, perturbed

DEEP = os.environ.get("SMPCHECK_FUZZ") == "deep"
settings.register_profile("smpcheck-fuzz-ci", max_examples=5, derandomize=True, database=None,
                          deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("smpcheck-fuzz-deep", max_examples=60, deadline=None, derandomize=False,
                          suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile("smpcheck-fuzz-deep" if DEEP else "smpcheck-fuzz-ci")
PARENT_S = 60  # a corruption the parent catches ends this fast, even on a busy machine
RUN_S = 240  # one that reaches the ranks

CONFIG_SIZES = ["hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                "num_key_value_heads", "num_hidden_layers", "max_position_embeddings"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny Llama saved twice: single file under ``single/``, three shards under
    ``sharded/``."""
    root = tmp_path_factory.mktemp("fuzz")
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    torch.manual_seed(0)
    model = perturbed(T.LlamaForCausalLM(config_cls(**kwargs)), 0)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return root


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


# Each corruption: (layout, kind, arguments drawn); applied by _corrupt to a fresh copy.
_PARENT_KINDS = ["truncate", "flip_header", "dtype", "shape", "offsets", "index_drop_entry",
                 "index_to_missing_file", "index_to_other_shard", "config_type",
                 "config_not_json", "config_size"]


@st.composite
def corruptions(draw) -> tuple[str, tuple]:
    kinds = _PARENT_KINDS + (["nan"] if DEEP else [])
    kind = draw(st.sampled_from(kinds))
    fraction = draw(st.floats(0, 1, exclude_max=True))
    if kind == "flip_header":
        return kind, (fraction, draw(st.integers(0, 255)))
    if kind == "dtype":
        return kind, (fraction, draw(st.sampled_from(["F16", "BF16", "I64", "U8", "F6_E3M2",
                                                      "float32"])))
    if kind == "shape":
        return kind, (fraction, draw(st.lists(st.integers(0, 70), max_size=3)))
    if kind == "offsets":
        return kind, (fraction, draw(st.integers(-8, 8).filter(bool)))
    if kind == "config_size":
        field = draw(st.sampled_from(CONFIG_SIZES if DEEP else CONFIG_SIZES[:3]))
        return kind, (field, draw(st.integers(1, 200)))
    return kind, (fraction,)


def _pick(items: list, fraction: float):
    return sorted(items)[int(fraction * len(items))]


def _corrupt(model: Path, kind: str, args: tuple) -> None:
    """Apply one corruption to the model directory ``model`` (a copy)."""
    single = model / "model.safetensors"
    index = model / "model.safetensors.index.json"
    if kind == "truncate":
        raw = single.read_bytes()
        single.write_bytes(raw[:int(args[0] * len(raw))])
    elif kind == "flip_header":
        raw = bytearray(single.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        where = 8 + int(args[0] * n)
        raw[where] = args[1] if raw[where] != args[1] else (args[1] + 1) % 256
        single.write_bytes(bytes(raw))
    elif kind in ("dtype", "shape", "offsets", "nan"):
        header, data = _header(single)
        key = _pick([k for k in header if k != "__metadata__"], args[0])
        if kind == "dtype":
            header[key]["dtype"] = args[1]
        elif kind == "shape":
            header[key]["shape"] = args[1]
        elif kind == "offsets":
            header[key]["data_offsets"][1] += args[1]
        else:
            begin, end = header[key]["data_offsets"]
            data = data[:begin] + b"\xff" * (end - begin) + data[end:]
        _write_header(single, header, data)
    elif kind.startswith("index"):
        data = json.loads(index.read_text())
        key = _pick(list(data["weight_map"]), args[0])
        if kind == "index_drop_entry":
            del data["weight_map"][key]
        elif kind == "index_to_missing_file":
            data["weight_map"][key] = "model-99999-of-99999.safetensors"
        else:
            shards = sorted(set(data["weight_map"].values()) - {data["weight_map"][key]})
            data["weight_map"][key] = shards[0]
        index.write_text(json.dumps(data))
    elif kind == "config_type":
        config = json.loads((model / "config.json").read_text())
        config["model_type"] = "llama-" + str(int(args[0] * 1000))
        (model / "config.json").write_text(json.dumps(config))
    elif kind == "config_not_json":
        text = (model / "config.json").read_text()
        (model / "config.json").write_text(text[:int(args[0] * (len(text) - 1))])
    elif kind == "config_size":
        config = json.loads((model / "config.json").read_text())
        config[args[0]] = args[1]
        (model / "config.json").write_text(json.dumps(config))
    else:
        raise AssertionError(f"unknown corruption {kind}")


def _layout(kind: str) -> str:
    return "sharded" if kind.startswith("index") else "single"


def _harmless(kind: str, before: Path, after: Path) -> bool:
    """True when the run may pass: a config size the model does not depend on, or a header
    byte flip that left the header meaning the same (padding, the free-form metadata)."""
    if kind == "config_size":
        return True
    if kind != "flip_header":
        return False
    try:
        header = _header(after / "model.safetensors")[0]
    except ValueError:
        return False
    original = _header(before / "model.safetensors")[0]
    return "__metadata__" in header and {k: v for k, v in header.items()
                                         if k != "__metadata__"} == {
        k: v for k, v in original.items() if k != "__metadata__"}


@settings(PROFILE)
@given(corruption=corruptions())
def test_any_corruption_ends_in_one_sentence(pristine, corruption) -> None:
    kind, args = corruption
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(shutil.copytree(pristine / _layout(kind), tmp / "model"))
        _corrupt(model, kind, args)
        harmless = _harmless(kind, pristine / _layout(kind), model)
        start = time.monotonic()
        out = run_cli("run", str(model), tmp=tmp, timeout=RUN_S)  # asserts no process left
        elapsed = time.monotonic() - start
    event(f"{kind}: exit {out.returncode}")  # pytest --hypothesis-show-statistics
    output = out.stdout + out.stderr
    assert "Traceback" not in output, output
    assert out.returncode in (0, 1, 2), output
    if out.returncode == 0:
        assert harmless, f"{corruption} passed unnoticed:\n{output}"
        return
    sentence = one_sentence(out.stderr)
    if out.returncode == 2:
        assert str(model) in sentence, sentence  # names the file
        assert elapsed < PARENT_S
    else:  # names a tensor and the ranks that hold it, as a finding does
        assert re.search(r"\w\.[\w.]+ \(ranks? [\d, ]+\)", sentence), (corruption, sentence)
