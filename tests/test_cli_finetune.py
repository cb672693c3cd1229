"""``smpcheck run`` on fine-tuning setups, through the real console script: a new task head,
a new LoRA adapter, a trained adapter directory, and the combinations that cannot run (exit 2,
one sentence, before any rank starts).

checkpoint_parity does not yet know fresh heads or PEFT's names, so these tests require every
other check to pass and checkpoint_parity to fail only on the tensors the checkpoint cannot
hold (the head, PEFT-renamed weights, adapters) or that the model does not use; once it
learns them the same tests require exit 0.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tests.console import one_sentence, report_json, run_cli
from tests.models import FAMILIES, write_checkpoint

HEAD = ["--model-class", "AutoModelForSequenceClassification", "--num-labels", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    return write_checkpoint(config_cls(**kwargs), tmp_path_factory.mktemp("ft") / "llama")


def assert_ran_and_only_parity_differs(out, tmp, stem: str, may_differ) -> dict:
    """Every phase ran, every check but checkpoint_parity passed (or skipped), and
    checkpoint_parity named only tensors ``may_differ(name)`` allows."""
    text = out.stdout + out.stderr
    assert "[smpcheck] load" in out.stdout and "[smpcheck] wrap" in out.stdout, text
    results = {r["name"]: r for r in report_json(tmp, stem)["results"]}
    bad = {n: r["status"] for n, r in results.items()
           if n != "checkpoint_parity" and r["status"] not in ("pass", "skip")}
    assert not bad, (bad, text)
    parity = results["checkpoint_parity"]
    named = {f["tensor"] for f in parity["findings"] if f["severity"] == "error"}
    assert all(may_differ(name) for name in named), (named, text)
    assert out.returncode == (0 if parity["status"] == "pass" else 1), text
    return results


def test_new_classification_head_with_smp(tmp_path, ckpt) -> None:
    out = run_cli("run", str(ckpt), *HEAD, tmp=tmp_path)
    assert_ran_and_only_parity_differs(out, tmp_path, "smpcheck-smp-tp1",
                                       lambda name: name == "score.weight")


def test_new_lora_with_modules_to_save_with_smp(tmp_path, ckpt) -> None:
    out = run_cli("run", str(ckpt), *HEAD, "--lora",
                  "r=4,alpha=8,targets=q_proj,v_proj,modules_to_save=score", tmp=tmp_path)
    results = assert_ran_and_only_parity_differs(
        out, tmp_path, "smpcheck-smp-tp1", lambda name: name.startswith("base_model.model."))
    # 21 base parameters, 4 x 2 adapters, the score's second copy, and the rotary buffers
    # (inv_freq; transformers 5 registers original_inv_freq too)
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    rotary = len(list(LlamaRotaryEmbedding(config=config_cls(**kwargs)).buffers()))
    assert f"{30 + rotary} tensors" in results["preflight"]["message"], results["preflight"]


def test_trained_adapter_dir_with_fsdp2(tmp_path, ckpt) -> None:
    from peft import LoraConfig, get_peft_model

    from reference_impl import load_on_rank0

    model = get_peft_model(load_on_rank0(ckpt, rank=0),
                           LoraConfig(r=4, target_modules=["gate_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter: lora_B no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(tmp_path / "adapter")
    out = run_cli("run", str(ckpt), "--strategy", "fsdp2", "--peft", str(tmp_path / "adapter"),
                  tmp=tmp_path)
    assert_ran_and_only_parity_differs(out, tmp_path, "smpcheck-fsdp2-tp1",
                                       lambda name: name.startswith("base_model.model."))


@pytest.mark.parametrize(("args", "sentence"), [
    (["--strategy", "streaming", *HEAD], "--strategy streaming loads the checkpoint's own model "
                                         "only; use --strategy smp or fsdp2"),
    (["--lora", "r=4,targets=q_proj", "--tp", "2"], "--lora and --peft cannot be combined with "
                                                    "--tp: our tensor-parallel plan does not "
                                                    "shard LoRA layers"),
    (["--lora", "r=4,targets=q_proj", "--peft", "x"], "--lora adds a new adapter and --peft "
                                                      "loads a trained one: pass one"),
    (["--lora", "r=4,targets=q_proj,qkv_proj"], "--lora targets=qkv_proj: LlamaForCausalLM has "
                                                "no module of that name"),
    (["--model-class", "AutoModelForSpeechSeq2Seq"], "AutoModelForSpeechSeq2Seq has no model "
                                                     "for config type LlamaConfig"),
    (["--config", "num_lables=3"], "--config num_lables: not an attribute of LlamaConfig"),
    (["--peft", "."], "--peft .: no adapter_config.json there"),
    (["--config", "intermediate_size=-1"], "intermediate_size=-1: transformers cannot build "
                                           "LlamaForCausalLM with this config (RuntimeError"),
])
def test_unsupported_or_wrong_setup_exits_2_with_one_sentence(tmp_path, ckpt, args,
                                                              sentence) -> None:
    """Refused in the parent before any rank starts (the console script's own path is tested
    in test_cli.py)."""
    out = run_cli("run", str(ckpt), *args, tmp=tmp_path)
    assert out.returncode == 2, out.stderr
    assert sentence in one_sentence(out.stderr), out.stderr


# -- the flags' parsing, in process -------------------------------------------------------------

def test_lora_spec_parses_lists_and_maps_to_peft() -> None:
    from smpcheck.strategies.finetune import parse_lora

    spec = parse_lora("r=8, alpha=16,targets=q_proj,v_proj,dropout=0.05,modules_to_save=score")
    assert (spec.r, spec.alpha, spec.dropout) == (8, 16.0, 0.05)
    assert spec.targets == ("q_proj", "v_proj") and spec.modules_to_save == ("score",)
    config = spec.peft_config()
    assert config.r == 8 and config.lora_alpha == 16 and config.lora_dropout == 0.05
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.modules_to_save == ["score"]
    assert parse_lora("targets=all-linear,r=2").peft_config().target_modules == "all-linear"
    assert parse_lora("r=2,targets=q_proj").alpha == 2.0  # PEFT's convention: alpha = r


@pytest.mark.parametrize(("text", "sentence"), [
    ("r=0,targets=q_proj", "r must be a positive integer, got 0"),
    ("r=two,targets=q_proj", "r must be one int, got 'two'"),
    ("r=4,q_proj", "'q_proj' has no key"),
    ("r=4", "--lora needs targets"),
    ("alpha=8,targets=q_proj", "--lora needs r"),
    ("r=4,rank=8,targets=q_proj", "--lora: unknown key 'rank'; use r, alpha"),
])
def test_lora_spec_errors_are_sentences(text, sentence) -> None:
    from smpcheck.checkpoint.source import UsageError
    from smpcheck.strategies.finetune import parse_lora

    with pytest.raises(UsageError, match=sentence):
        parse_lora(text)


def test_config_overrides_parse_values_as_json() -> None:
    from smpcheck.checkpoint.source import UsageError
    from smpcheck.strategies.finetune import parse_config_overrides

    overrides = parse_config_overrides(
        ['id2label={"0": "neg", "1": "pos"}', "problem_type=single_label_classification",
         "rms_norm_eps=1e-3", "use_cache=false"], num_labels=None)
    assert overrides == {"id2label": {"0": "neg", "1": "pos"},
                         "problem_type": "single_label_classification",
                         "rms_norm_eps": 1e-3, "use_cache": False}
    assert parse_config_overrides([], num_labels=3) == {"num_labels": 3}
    with pytest.raises(UsageError, match="write KEY=VALUE"):
        parse_config_overrides(["num_labels"], num_labels=None)
