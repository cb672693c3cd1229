"""Parent-side validation of a model directory (``smpcheck.checkpoint.inputs``), in process:
each class of broken input is one sentence naming the file and the key; every family we support, MoE
and renamed keys included, passes untouched; and the header rules agree with ``safe_open``."""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from reference_impl.loading import model_class_for
from smpcheck.checkpoint.inputs import INDEX, read_header, validate
from smpcheck.checkpoint.source import UsageError
from tests.models import FAMILIES, MIXTRAL, perturbed, write_checkpoint

LLAMA = FAMILIES["llama-gqa-untied"]


def check(path: Path) -> None:
    validate(path, model_class_for)


def problem(path: Path) -> str:
    """The sentence ``validate`` raises for ``path`` (fails the test when it passes)."""
    with pytest.raises(UsageError) as info:
        check(path)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def rewrite_header(file: Path, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """A single-file and a sharded tiny Llama, written once; tests corrupt copies."""
    root = tmp_path_factory.mktemp("pristine")
    config_cls, kwargs = LLAMA
    single = write_checkpoint(config_cls(**kwargs), root / "single")
    torch.manual_seed(0)
    model = perturbed(T.LlamaForCausalLM(config_cls(**kwargs)), 0)
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return {"single": single, "sharded": root / "sharded"}


@pytest.fixture
def single(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["single"], tmp_path / "single"))


@pytest.fixture
def sharded(pristine, tmp_path) -> Path:
    path = Path(shutil.copytree(pristine["sharded"], tmp_path / "sharded"))
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


# -- what must pass -------------------------------------------------------------------------

@pytest.mark.parametrize("family", [*FAMILIES, "mixtral"])
def test_every_supported_family_passes(tmp_path, family) -> None:
    config_cls, kwargs = MIXTRAL if family == "mixtral" else FAMILIES[family]
    check(write_checkpoint(config_cls(**kwargs), tmp_path / family))


def test_sharded_checkpoint_passes_quickly(sharded) -> None:
    check(sharded)  # warm: the model class is imported once per process
    start = time.perf_counter()
    check(sharded)
    assert time.perf_counter() - start < 3.0


class _ValueComputingLlama(T.LlamaForCausalLM):
    """A constructor that reads a value (as drop-path schedules do): impossible on meta."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.rate = torch.linspace(0, 0.1, 3)[1].item()


def test_a_model_that_computes_on_values_at_init_is_not_refused(single) -> None:
    validate(single, lambda config: _ValueComputingLlama)


# -- config.json ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "words"), [
    ('{"model_type": "llama", ', "config.json is not valid JSON (JSONDecodeError"),
    ("[1, 2]", "config.json holds a JSON list, not the object of a model config"),
    ('{"hidden_size": 32}', "config.json has no model_type"),
    ('{"model_type": "no-such-arch"}', "model_type 'no-such-arch' is not known to transformers"),
    ('{"model_type": "mine", "auto_map": {"AutoConfig": "x.Cfg"}}', "runs without "
     "trust_remote_code"),
])
def test_unreadable_or_unknown_config(single, text, words) -> None:
    (single / "config.json").write_text(text)
    assert words in problem(single)


def test_config_that_transformers_refuses(single) -> None:
    edit_json(single / "config.json", lambda c: c.update(hidden_size=30))
    sentence = problem(single)
    try:
        T.AutoConfig.from_pretrained(single)
    except Exception:  # transformers 5 validates the head arithmetic itself (its own error type)
        assert "config.json does not load as a llama config" in sentence
        assert "not a multiple of the number of attention heads" in sentence
    else:  # 4.x loads it: the weights saved with the real config then disagree with it
        assert "the config and the weights disagree" in sentence


@pytest.mark.parametrize(("field", "value", "key"), [
    ("intermediate_size", 48, "model.layers.0.mlp.gate_proj.weight"),
    ("vocab_size", 100, "model.embed_tokens.weight"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight"),
])
def test_config_and_weights_that_disagree(single, field, value, key) -> None:
    edit_json(single / "config.json", lambda c: c.update({field: value}))
    sentence = problem(single)
    assert f"model.safetensors: {key} has shape" in sentence
    assert "the config and the weights disagree" in sentence


def test_more_layers_in_the_config_than_the_weights_is_left_to_the_checks(single) -> None:
    """Layers the weights lack are missing tensors: a data fault (exit 1, named), not bad
    input; the shapes of the layers present still agree."""
    edit_json(single / "config.json", lambda c: c.update(num_hidden_layers=3))
    check(single)


# -- safetensors files ----------------------------------------------------------------------

def _short(file: Path) -> None:
    file.write_bytes(b"\x01\x02")


def _header_beyond_file(file: Path) -> None:
    file.write_bytes(struct.pack("<Q", 10**6) + b"{}")


def _not_json(file: Path) -> None:
    raw = file.read_bytes()
    file.write_bytes(raw[:8] + b"!" + raw[9:])


def _truncated(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def _trailing(file: Path) -> None:
    file.write_bytes(file.read_bytes() + b"\0" * 16)


KEY = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(("corrupt", "words"), [
    (_short, "is 2 bytes, too short for a safetensors header"),
    (_header_beyond_file, "declares a 1000000-byte header but is 10 bytes long"),
    (_not_json, "has an unreadable safetensors header"),
    (_truncated, "holds only"),
    (_trailing, "holds 16 bytes after its last tensor"),
    (lambda f: rewrite_header(f, lambda h: h[KEY].update(dtype="F16")),
     f"tensor {KEY} is F16 of shape [64, 32], 4096 bytes, but its data_offsets hold 8192"),
    (lambda f: rewrite_header(f, lambda h: h[KEY].update(dtype="Q4")),
     f"tensor {KEY} has dtype 'Q4', which safetensors does not know"),
    (lambda f: rewrite_header(f, lambda h: h[KEY].update(dtype="F6_E2M3")),
     "which torch cannot load"),
    (lambda f: rewrite_header(f, lambda h: h[KEY].update(shape=[64, "32"])),
     f"tensor {KEY} has shape [64, '32'], not a list of sizes"),
    (lambda f: rewrite_header(f, lambda h: h[KEY].update(data_offsets=[0])),
     f"tensor {KEY} has data_offsets [0], not [begin, end]"),
    (lambda f: rewrite_header(f, lambda h: h[KEY].update(
        data_offsets=[h[KEY]["data_offsets"][0] + 4, h[KEY]["data_offsets"][1] + 4])),
     "(overlapping or gapped offsets)"),
])
def test_unreadable_safetensors(single, corrupt, words) -> None:
    corrupt(single / "model.safetensors")
    sentence = problem(single)
    assert str(single / "model.safetensors") in sentence and words in sentence, sentence


def test_no_weights_at_all(single) -> None:
    (single / "model.safetensors").unlink()
    assert "no model.safetensors or model.safetensors.index.json in" in problem(single)


# -- sharded index --------------------------------------------------------------------------

def test_index_that_is_not_json(sharded) -> None:
    (sharded / INDEX).write_text("{")
    assert f"{INDEX} is not valid JSON" in problem(sharded)


def test_index_without_weight_map(sharded) -> None:
    edit_json(sharded / INDEX, lambda d: d.pop("weight_map"))
    assert "has no weight_map of tensor name -> file name" in problem(sharded)


def test_index_naming_a_missing_file(sharded) -> None:
    shard = sorted(set(weight_map(sharded).values()))[1]
    (sharded / shard).unlink()
    assert f"{shard}, which does not exist in" in problem(sharded)


def test_index_putting_a_key_in_the_wrong_shard(sharded) -> None:
    key, shard = next(iter(weight_map(sharded).items()))
    other = next(s for s in sorted(set(weight_map(sharded).values())) if s != shard)
    edit_json(sharded / INDEX, lambda d: d["weight_map"].update({key: other}))
    sentence = problem(sharded)
    assert f"puts {key} in {other}, but it is in {shard}" in sentence


def test_index_naming_a_key_no_shard_holds(sharded) -> None:
    shard = next(iter(weight_map(sharded).values()))
    edit_json(sharded / INDEX, lambda d: d["weight_map"].update({"model.ghost.weight": shard}))
    assert "puts model.ghost.weight in" in problem(sharded) and "no shard holds it" in problem(
        sharded)


def test_shard_holding_a_key_the_index_does_not_list(sharded) -> None:
    key = next(iter(weight_map(sharded)))
    edit_json(sharded / INDEX, lambda d: d["weight_map"].pop(key))
    sentence = problem(sharded)
    assert f"holds {key}, which {INDEX} does not list" in sentence


def test_key_in_two_shards(sharded) -> None:
    wm = weight_map(sharded)
    key, shard = next(iter(wm.items()))
    other = next(s for s in sorted(set(wm.values())) if s != shard)
    with safe_open(str(sharded / other), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    with safe_open(str(sharded / shard), "pt") as handle:
        tensors[key] = handle.get_tensor(key)
    save_file(tensors, str(sharded / other), metadata={"format": "pt"})
    assert f"{key} is in both" in problem(sharded)


# -- the header rules are safe_open's --------------------------------------------------------

def _safe_open_reads_all(file: Path) -> bool:
    try:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
        return True
    except Exception:  # noqa: BLE001 - any refusal
        return False


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    file = tmp_path_factory.mktemp("st") / "small.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16),
               "c": torch.ones(2, 2, dtype=torch.int64)}, str(file), metadata={"format": "pt"})
    return file.read_bytes()


_FIELD_VALUES = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F4", "F6_E2M3", "X", 3, None]),
    "shape": st.one_of(st.lists(st.integers(-1, 13), max_size=3), st.none(),
                       st.just([2, "x"]), st.just([True, 12])),
    "data_offsets": st.one_of(st.lists(st.integers(-1, 120), min_size=0, max_size=3),
                              st.none()),
}


@st.composite
def corruptions(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["truncate", "flip", "append", "field", "drop"]))
    if kind == "truncate":
        return kind, draw(st.floats(0, 1))
    if kind == "flip":
        return kind, draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                   min_size=1, max_size=3))
    if kind == "append":
        return kind, draw(st.integers(1, 9))
    key = draw(st.sampled_from(["a", "b", "c"]))
    if kind == "drop":
        return kind, key
    name = draw(st.sampled_from(sorted(_FIELD_VALUES)))
    return kind, (key, name, draw(_FIELD_VALUES[name]))


def _corrupted(raw: bytes, kind: str, arg) -> bytes:
    if kind == "truncate":
        return raw[:int(arg * len(raw))]
    if kind == "flip":
        out = bytearray(raw)
        for where, value in arg:
            out[min(int(where * len(raw)), len(raw) - 1)] = value
        return bytes(out)
    if kind == "append":
        return raw + b"\0" * arg
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if kind == "drop":
        del header[arg]
    else:
        key, name, value = arg
        header[key][name] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corruption=corruptions())
def test_header_rules_agree_with_safe_open(tmp_path, small_file, corruption) -> None:
    """What ``read_header`` accepts, ``safe_open`` reads in full, and the other way round: no
    corrupt file slips through to a rank, and no readable file is refused."""
    file = tmp_path / "c.safetensors"
    file.write_bytes(_corrupted(small_file, *corruption))
    try:
        read_header(file)
        accepted = True
    except UsageError:
        accepted = False
    assert accepted == _safe_open_reads_all(file)
