"""The recipe for real fine-tuning setups, on real gloo groups: a new task head
(``num_labels=3``), LoRA adapters attached after rank-0 loading (with and without
``modules_to_save``), under FSDP1 (the SMP recipe) and FSDP2.

Each rank seeds its RNG differently, so a rank that kept its own fresh head or adapter instead
of rank 0's shows. The expected values are computed here, independently of the recipe: the
checkpoint file for base weights (PEFT's renames undone by hand), rank 0's tensors as they
were before wrapping for everything the checkpoint lacks, and a single-process model holding
rank 0's values for the logits.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as T
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from reference_impl import DelayedParamIniter, apply_fsdp1, apply_fsdp2, load_on_rank0
from reference_impl.adapters import attach_adapter
from reference_impl.loading import split_from_pretrained_kwargs
from tests.models import FAMILIES, write_checkpoint

LOGITS_ATOL = 1e-6  # fp32, same ops in the same order
INPUT_IDS = torch.tensor([[5, 17, 33, 2, 71, 9], [40, 3, 88, 12, 6, 1]])

# name -> (model class, config overrides, LoRA config or None)
SETUPS: dict[str, tuple[str | None, dict, dict | None]] = {
    "seq-cls": ("AutoModelForSequenceClassification", {"num_labels": 3, "pad_token_id": 0},
                None),
    "tok-cls": ("AutoModelForTokenClassification",
                {"id2label": {0: "O", 1: "B-PER", 2: "I-PER"}}, None),
    "lora-attn": (None, {}, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "lora-mlp": (None, {}, {"r": 4, "lora_alpha": 8,
                            "target_modules": ["gate_proj", "up_proj", "down_proj"]}),
    "lora-save-head": ("AutoModelForSequenceClassification",
                       {"num_labels": 3, "pad_token_id": 0},
                       {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                        "modules_to_save": ["score"]}),
}
FAMILY = {"lora-attn": "llama-gqa-tied"}  # a tied causal LM under PEFT; the rest untied


def build(path: str, setup: str, rank: int):
    """This rank's model before wrapping: rank 0 real, the others on meta."""
    model_class, overrides, lora = SETUPS[setup]
    model = load_on_rank0(path, rank=rank, model_class=model_class, **overrides)
    if lora is not None:
        from peft import LoraConfig

        model = attach_adapter(model, peft_config=LoraConfig(**lora), rank=rank)
    return model


def portable(tensors: dict[str, torch.Tensor]) -> dict:
    """Tensors as numpy arrays: torch's own pickling shares memory with a rank that exits."""
    return {n: t.detach().cpu().numpy().copy() for n, t in tensors.items()}


def as_tensors(arrays: dict | None) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a) for n, a in (arrays or {}).items()}


def run_recipe(path: str, setup: str, fsdp: str, use_orig_params: bool = True) -> dict:
    """The recipe on this rank; what it holds afterwards (numpy arrays, see ``portable``)."""
    rank = dist.get_rank()
    torch.manual_seed(1000 + rank)  # rank 1's own fresh head/adapters would differ from rank 0's
    model = build(path, setup, rank)
    before = portable(model.state_dict()) if rank == 0 else None
    initer = DelayedParamIniter(model, device="cpu") if rank else None
    if fsdp == "fsdp1":
        wrapped = apply_fsdp1(model, device="cpu", initer=initer,
                              use_orig_params=use_orig_params)
    else:
        wrapped = apply_fsdp2(model, device="cpu", initer=initer)
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        logits = wrapped(input_ids=INPUT_IDS).logits
    buffers = {re.sub(r"_fsdp_wrapped_module\.", "", n): b for n, b in wrapped.named_buffers()}
    return {"full": portable(full), "before": before, "buffers": portable(buffers),
            "logits": logits.numpy()}


def checkpoint_name(name: str) -> str:
    """The checkpoint's name of a tensor: PEFT's prefix and ``.base_layer`` removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def single_process_model(path: str, setup: str, values: dict[str, torch.Tensor]):
    """The same architecture in this process, holding ``values`` (rank 0's)."""
    model = build(path, setup, rank=0)
    model.load_state_dict(values, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    paths = {}
    for family in ("llama-gqa-untied", "llama-gqa-tied"):
        config_cls, kwargs = FAMILIES[family]
        paths[family] = write_checkpoint(config_cls(**kwargs), root / family, seed=7)
    return paths


def assert_recipe_correct(path: Path, setup: str, results: list[dict]) -> None:
    """Every check the brief names, against values computed here."""
    results = [{k: as_tensors(v) if isinstance(v, dict) or v is None else torch.from_numpy(v)
                for k, v in res.items()} for res in results]
    on_disk = load_file(str(path / "model.safetensors"))
    rank0 = results[0]["before"]
    fresh = [n for n in rank0 if checkpoint_name(n) not in on_disk
             and ".original_module." not in n]
    assert fresh, "the setup must have tensors the checkpoint lacks"
    reference = single_process_model(str(path), setup, rank0)
    with torch.no_grad():
        expected_logits = reference(input_ids=INPUT_IDS).logits
    expected_buffers = dict(reference.named_buffers())
    assert any("inv_freq" in n for n in expected_buffers)
    for rank, res in enumerate(results):
        full = res["full"]
        assert set(full) == set(rank0), (rank, set(full) ^ set(rank0))
        differ = [n for n in rank0 if not torch.equal(full[n], rank0[n])]
        assert not differ, f"rank {rank} differs from rank 0 in {differ}"
        for name, value in full.items():
            key = checkpoint_name(name).replace(".original_module.", ".")
            if key in on_disk:
                assert torch.equal(value, on_disk[key]), (rank, name)
        for name in fresh:
            if "lora_B" in name or name.endswith(".bias"):
                assert not full[name].any(), (rank, name, "lora_B and biases start at zero")
            else:
                assert full[name].abs().sum() > 0, (rank, name)
        for name in [n for n in full if ".original_module." in n]:  # modules_to_save copy
            copy = name.replace(".original_module.", ".modules_to_save.default.")
            assert torch.equal(full[name], full[copy]), (rank, name)
        for name, buf in res["buffers"].items():
            assert torch.equal(buf, expected_buffers[name]), (rank, name)
        assert (res["logits"] - expected_logits).abs().max() <= LOGITS_ATOL, rank
    # the sync did something: rank 1 seeded differently, so its own init would differ
    torch.manual_seed(1001)
    own = build(str(path), setup, 0).state_dict()
    assert any(not torch.equal(own[n], rank0[n]) for n in fresh if "lora_B" not in n)


@pytest.mark.parametrize("fsdp", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_rank_holds_rank0_values(ranks, untied, setup, fsdp) -> None:
    path = untied[FAMILY.get(setup, "llama-gqa-untied")]
    results = ranks(run_recipe, 2, args=(str(path), setup, fsdp))
    assert_recipe_correct(path, setup, results)
    if setup.endswith("cls"):
        assert results[1]["full"]["score.weight"].shape[0] == 3


def test_lora_with_flat_parameters_fsdp1(ranks, untied) -> None:
    """``use_orig_params=False`` (PEFT's advice for memory): trainable adapters and frozen base
    weights must land in different flat parameters."""
    path = untied["llama-gqa-untied"]
    results = ranks(run_recipe, 2, args=(str(path), "lora-save-head", "fsdp1", False))
    assert_recipe_correct(path, "lora-save-head", results)


def run_with_trained_adapter(path: str, adapter: str, fsdp: str) -> dict:
    """A trained adapter: rank 0 reads its weights, the others only its config."""
    rank = dist.get_rank()
    model = attach_adapter(load_on_rank0(path, rank=rank), adapter_dir=adapter, rank=rank)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    initer = DelayedParamIniter(model, device="cpu") if rank else None
    apply = apply_fsdp1 if fsdp == "fsdp1" else apply_fsdp2
    full = get_model_state_dict(apply(model, device="cpu", initer=initer),
                                options=StateDictOptions(full_state_dict=True))
    return {"lora": portable({n: t for n, t in full.items() if "lora_" in n}),
            "trainable": trainable}


@pytest.mark.parametrize("fsdp", ["fsdp1", "fsdp2"])
def test_trained_adapter_reaches_every_rank(ranks, untied, tmp_path, fsdp) -> None:
    from peft import LoraConfig, get_peft_model

    path = untied["llama-gqa-untied"]
    trained = get_peft_model(load_on_rank0(path, rank=0),
                             LoraConfig(r=4, target_modules=["gate_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.normal_()
    trained.save_pretrained(tmp_path / "adapter")
    on_disk = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    results = ranks(run_with_trained_adapter, 2, args=(str(path), str(tmp_path / "adapter"), fsdp))
    for rank, res in enumerate(results):
        lora = as_tensors(res["lora"])
        assert len(lora) == len(on_disk) == 8, rank
        for name, value in lora.items():
            assert torch.equal(value, on_disk[name.replace(".default.", ".")]), (rank, name)
        assert res["trainable"] == sorted(lora), "adapters train, base weights stay frozen"


# -- config overrides reach the meta model -----------------------------------------------------

def fsdp1_with_overrides(path: str) -> list[int]:
    """Regression: rank 0 got num_labels=3 from from_pretrained, the meta model the config's
    default of 2, and FSDP1's broadcast aborted inside gloo."""
    model = load_on_rank0(path, model_class=T.LlamaForSequenceClassification, num_labels=3)
    initer = DelayedParamIniter(model, device="cpu") if dist.get_rank() else None
    wrapped = apply_fsdp1(model, device="cpu", initer=initer)
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    return list(full["score.weight"].shape)


def test_num_labels_reaches_the_meta_model(ranks, untied) -> None:
    shapes = ranks(fsdp1_with_overrides, 2, args=(str(untied["llama-gqa-untied"]),))
    assert shapes == [[3, 32], [3, 32]]


@pytest.mark.parametrize(("overrides", "attr", "value"), [
    ({"num_labels": 5}, "num_labels", 5),
    ({"id2label": {0: "neg", 1: "neu", 2: "pos"}}, "num_labels", 3),
    ({"num_hidden_layers": 1}, "num_hidden_layers", 1),
    ({"rms_norm_eps": 1e-3}, "rms_norm_eps", 1e-3),
])
def test_config_overrides_apply_to_both_paths(untied, overrides, attr, value) -> None:
    path = untied["llama-gqa-untied"]
    kwargs = dict(model_class="AutoModelForSequenceClassification", **overrides)
    real = load_on_rank0(path, rank=0, **kwargs)
    meta = load_on_rank0(path, rank=1, **kwargs)
    assert getattr(real.config, attr) == getattr(meta.config, attr) == value
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert shapes == {n: p.shape for n, p in meta.named_parameters()}
    assert all(p.is_meta for p in meta.parameters())


def test_kwargs_split_like_transformers(untied) -> None:
    spec = split_from_pretrained_kwargs(
        untied["llama-gqa-untied"], "AutoModelForTokenClassification", num_labels=4,
        revision=None, device_map="cpu", dtype=torch.bfloat16, attn_implementation="eager",
        output_hidden_states=True)
    assert spec.model_class is T.LlamaForTokenClassification
    assert spec.config.num_labels == 4 and spec.config.output_hidden_states
    assert spec.config._attn_implementation == "eager" and spec.dtype == torch.bfloat16
    assert spec.download_kwargs == {"revision": None}
    assert spec.loading_kwargs == {"device_map": "cpu"} and spec.init_kwargs == {}


@pytest.mark.parametrize(("model_class", "sentence"), [
    ("AutoModelForSpeechSeq2Seq", "has no model for config type LlamaConfig"),
    ("NoSuchModel", "'NoSuchModel' is not a transformers model class"),
])
def test_unknown_model_class_is_one_sentence(untied, model_class, sentence) -> None:
    with pytest.raises(ValueError, match=sentence):
        load_on_rank0(untied["llama-gqa-untied"], rank=1, model_class=model_class)


# -- DelayedParamIniter on a meta PeftModel, in process ---------------------------------------

def meta_peft_model(path: Path, **lora):
    from peft import LoraConfig

    model = load_on_rank0(path, rank=1, model_class="AutoModelForSequenceClassification",
                          num_labels=3)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                        modules_to_save=["score"], **lora)
    return attach_adapter(model, peft_config=config, rank=1)


def materialise_child_first(model, initer) -> None:
    """Every module through ``param_init_fn``, leaves first: ``lora_A`` is done (and could be
    flattened by FSDP1) before ``lora_B``'s init runs."""
    init_fn = initer.get_param_init_fn()
    for module in reversed(list(model.modules())):
        init_fn(module)


@pytest.mark.parametrize("rule", [True, "gaussian", False])
def test_lora_adapters_on_meta_get_peft_rules(untied, rule) -> None:
    model = meta_peft_model(untied["llama-gqa-untied"], init_lora_weights=rule)
    initer = DelayedParamIniter(model, device="cpu")
    materialise_child_first(model, initer)
    assert initer.find_problems() == []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in
    if rule is True:
        assert not b.any() and a.any() and a.abs().max() <= bound
    elif rule == "gaussian":
        assert not b.any() and a.abs().max() > bound  # normal(0, 1/r), far wider
    else:  # PEFT leaves nn.Linear's own init: B is not zero
        assert b.any() and b.abs().max() <= 1 / b.shape[1] ** 0.5
    emb = model.base_model.model.model.embed_tokens
    if rule is not False:
        assert not emb.lora_embedding_A["default"].any(), "embedding A starts at zero"
        assert emb.lora_embedding_B["default"].any()
    inv_freq = model.base_model.model.model.rotary_emb.inv_freq
    fresh = load_on_rank0(untied["llama-gqa-untied"], rank=1).model.rotary_emb.inv_freq
    assert torch.equal(inv_freq, fresh)


def test_validator_names_uninitialised_adapter_and_garbage_buffer(untied) -> None:
    model = meta_peft_model(untied["llama-gqa-untied"])
    initer = DelayedParamIniter(model, device="cpu")
    materialise_child_first(model, initer)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("nan"))
        model.base_model.model.model.rotary_emb.inv_freq.fill_(1e-30)
    problems = initer.find_problems()
    prefix = "base_model.model.model."
    assert problems == [
        f"{prefix}layers.1.self_attn.v_proj.lora_B.default.weight: contains NaN or Inf",
        f"{prefix}rotary_emb.inv_freq: buffer differs from its value computed from the config "
        "(to_empty garbage?); recompute it, e.g. with get_post_param_init_fn()(model)",
    ]
