"""Breadth: what smpcheck knows of a model comes from transformers' own objects and code, so
architectures beyond the families it was taught are judged right.

In-process on real checkpoints written with ``save_pretrained`` (one rank, no group: the
judgements under test are rank-local): the skeleton is built from the config object (a value
JSON cannot hold does not break it), config fields are judged at their own sub-config, a field
the config class itself changes on load is named, the smoke batch takes the shape the model's
forward takes, and only parameters are held to the magnitude rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T

import smpcheck
from smpcheck.checks.config_parity import _generic_fields, classify, own_field
from smpcheck.checks.forward import smoke_batch
from smpcheck.expect.skeleton import skeleton_of
from tests.models import FAMILIES, perturbed


def _verify(model: torch.nn.Module, path: Path, checks: list[str]) -> dict:
    report = smpcheck.verify(model, checkpoint=path, checks=checks)
    return {r.name: (r.status.value, [f.tensor for f in r.findings if f.severity == "error"],
                     r.message) for r in report.results}


def test_a_config_value_json_cannot_hold_still_builds_the_skeleton() -> None:
    """Mamba2's ``time_step_limit`` holds infinity: a JSON round trip rebuilds it as a dict
    the strict config class refuses."""
    config = T.Mamba2Config(hidden_size=32, num_hidden_layers=1, vocab_size=64, num_heads=4,
                            head_dim=16, state_size=8, n_groups=1, expand=2)
    assert config.time_step_limit[1] == float("inf")
    fresh = skeleton_of(T.Mamba2ForCausalLM, config)
    assert fresh.config.time_step_limit == config.time_step_limit
    assert fresh.config is not config  # built from a copy: the caller's config is untouched


def test_fields_are_judged_at_their_own_sub_config() -> None:
    config = T.LlavaConfig(text_config=T.LlamaConfig(hidden_size=32), vision_config=None)
    generic = _generic_fields()
    assert own_field("text_config.dtype", config) == "dtype"
    assert classify("text_config.dtype", generic, config) == "warning"
    assert classify("text_config.hidden_size", generic, config) == "error"
    assert classify("text_config._attn_implementation_internal", generic, config) is None
    assert own_field("rope_parameters.rope_theta", T.LlamaConfig()) == "rope_parameters"
    assert classify("rope_parameters.rope_theta", generic, T.LlamaConfig()) == "error"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    torch.manual_seed(0)
    perturbed(T.AutoModelForCausalLM.from_config(config_cls(**kwargs)), 0).save_pretrained(path)
    return path


def test_a_field_the_config_class_resets_on_load_is_named(llama, monkeypatch) -> None:
    """Both the running config and config.json loaded through the class carry the class's
    value; only the raw file still holds the saved one."""
    saved = json.loads((llama / "config.json").read_text())["rms_norm_eps"]
    original = T.LlamaConfig.from_dict.__func__

    def lossy(cls, config_dict, **kwargs):
        out = original(cls, config_dict, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        config.rms_norm_eps = 1e-3  # the class "forgets" the saved value on every load
        return out

    model = T.AutoModelForCausalLM.from_pretrained(llama)
    assert _verify(model, llama, ["config_parity"])["config_parity"][0] == "pass"
    monkeypatch.setattr(T.LlamaConfig, "from_dict", classmethod(lossy))
    model = T.AutoModelForCausalLM.from_pretrained(llama)
    assert model.config.rms_norm_eps == 1e-3 != saved
    status, errors, _ = _verify(model, llama, ["config_parity"])["config_parity"]
    assert (status, errors) == ("fail", ["config.rms_norm_eps"])


def test_a_constant_mask_buffer_is_not_garbage_but_nan_in_it_is(llama) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(llama)
    layer = model.model.layers[0]
    layer.register_buffer("mask", torch.full((4, 4), -1e9).triu(1))  # a model's own constant
    layer.register_buffer("ninf", torch.full((2,), float("-inf")))
    assert _verify(model, llama, ["initialised"])["initialised"][0] == "pass"
    layer.mask[0, 0] = float("nan")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 3e9
    status, errors, _ = _verify(model, llama, ["initialised"])["initialised"]
    assert status == "fail"
    assert sorted(errors) == ["model.layers.0.mask", "model.layers.1.mlp.up_proj.weight"]


def test_the_smoke_batch_takes_the_shape_the_model_takes() -> None:
    llama = T.AutoModelForCausalLM.from_config(FAMILIES["llama-gqa-tied"][0](
        **FAMILIES["llama-gqa-tied"][1]))
    batch = smoke_batch(llama)
    assert {k: tuple(v.shape) for k, v in batch.inputs.items()} == {"input_ids": (1, 16)}
    music = T.MusicgenForCausalLM(T.MusicgenDecoderConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
        num_codebooks=4, pad_token_id=0, bos_token_id=0))
    batch = smoke_batch(music)
    assert tuple(batch.inputs["input_ids"].shape) == (4, 16)  # one row per codebook
    assert music(**batch.inputs, **batch.kwargs).logits.shape[-1] == 64
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_ff=64,
                                                 num_layers=1, num_heads=4, d_kv=8))
    batch = smoke_batch(t5)
    assert set(batch.inputs) == {"input_ids", "decoder_input_ids"}
    assert t5(**batch.inputs, **batch.kwargs).logits.shape == (1, 16, 64)


class _Picky(T.LlamaForCausalLM):
    """A model whose own forward takes no batch smpcheck can build."""

    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[-1] != 7:
            raise ValueError(f"expects 7 positions, got {input_ids.shape[-1]}")
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_forward_the_unwrapped_model_rejects_too_is_a_skip_naming_its_error(llama) -> None:
    model = _Picky.from_pretrained(llama)
    status, _, message = _verify(model, llama, ["forward"])["forward"]
    assert status == "skip", message
    assert "expects 7 positions, got 16" in message
