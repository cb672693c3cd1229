"""The validator names each planted fault (tensor and rank) and stays quiet on a correct setup."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from torch import nn

from reference_impl import DelayedParamIniter, apply_fsdp1, apply_fsdp2, load_on_rank0
from smpcheck.runner import RankError


class Adapter(nn.Module):
    """A custom layer with no reset_parameters, which no _init_weights knows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))


def init_adapter(module: nn.Module) -> None:
    if isinstance(module, Adapter):
        nn.init.ones_(module.scale)


def fsdp1_with_adapter(path: str, give_init: bool) -> str:
    model = load_on_rank0(path)
    with init_empty_weights() if dist.get_rank() else torch.device("cpu"):
        model.model.norm.adapter = Adapter(model.config.hidden_size)
    initer = (
        DelayedParamIniter(
            model, init_method_using_config=init_adapter if give_init else None, device="cpu"
        )
        if dist.get_rank()
        else None
    )
    apply_fsdp1(model, device="cpu", initer=initer)
    return "ok"


def test_module_without_any_init_is_named(ranks, checkpoints) -> None:
    with pytest.raises(RankError) as err:
        ranks(fsdp1_with_adapter, 2, args=(str(checkpoints["llama-gqa-untied"]), False))
    assert err.value.rank == 1 and "ParamInitError" in err.value.exc_type
    text = str(err.value)
    assert "model.norm.adapter.scale" in text and "Adapter" in text
    assert "init_method_using_config" in text


def test_module_with_user_init_passes(ranks, checkpoints) -> None:
    path = str(checkpoints["llama-gqa-untied"])
    assert ranks(fsdp1_with_adapter, 2, args=(path, True)) == ["ok", "ok"]


def fsdp2_then_garbage_buffer(path: str) -> str:
    """FSDP2 flow whose rotary buffer is small finite garbage, as in Synthyra/FastPLMs#47."""
    model = load_on_rank0(path)
    initer = DelayedParamIniter(model, device="cpu")
    with initer.validate_params_and_buffers_inited():
        apply_fsdp2(model, device="cpu", initer=initer if dist.get_rank() else None)
        if dist.get_rank() == 1:
            model.model.rotary_emb.inv_freq[0] = 6.93e-18
    return "ok"


def test_buffer_left_as_garbage_is_named(ranks, checkpoints) -> None:
    with pytest.raises(RankError) as err:
        ranks(fsdp2_then_garbage_buffer, 2, args=(str(checkpoints["llama-gqa-tied"]),))
    assert err.value.rank == 1
    assert "model.rotary_emb.inv_freq: buffer differs" in str(err.value)
    assert "original_inv_freq" not in str(err.value)


def init_all_but(path: str, skip: str) -> list[str]:
    model = load_on_rank0(path, rank=1)  # meta on every rank
    initer = DelayedParamIniter(model, device="cpu")
    init_fn = initer.get_param_init_fn()
    for name, module in model.named_modules():
        if name != skip:
            init_fn(module)
    return initer.find_problems()


def test_tensor_left_on_meta_is_named(ranks, checkpoints) -> None:
    path = str(checkpoints["llama-gqa-tied"])
    for problems in ranks(init_all_but, 2, args=(path, "model.norm")):
        assert problems == [
            "model.norm.weight: still on the meta device (param_init_fn never "
            "reached its module: ignored by FSDP, or outside every wrapped unit?)"
        ]
    assert ranks(init_all_but, 2, args=(path, "nothing")) == [[], []]


def test_init_touches_only_the_modules_own_tensors(checkpoints) -> None:
    model = load_on_rank0(str(checkpoints["llama-gqa-tied"]), rank=1)
    init_fn = DelayedParamIniter(model, device="cpu").get_param_init_fn()
    layer = model.model.layers[0]
    init_fn(layer.self_attn.q_proj)
    marker = layer.self_attn.q_proj.weight.detach().clone().fill_(7.0)
    layer.self_attn.q_proj.weight.data.copy_(marker)
    for module in layer.modules():  # the parent first, as FSDP1 does
        init_fn(module)
    assert torch.equal(layer.self_attn.q_proj.weight, marker), "a materialised child was re-init"
    assert not any(p.is_meta for p in layer.parameters())


def test_tied_weights_share_one_parameter_in_any_order(checkpoints) -> None:
    model = load_on_rank0(str(checkpoints["llama-gqa-tied"]), rank=1)
    init_fn = DelayedParamIniter(model, device="cpu").get_param_init_fn()
    init_fn(model.model.embed_tokens)
    init_fn(model.lm_head)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta


def test_count_num_params_counts_tied_once(checkpoints) -> None:
    model = load_on_rank0(str(checkpoints["llama-gqa-tied"]), rank=1)
    unique = {id(p): p.numel() for p in model.parameters()}
    extra = nn.Parameter(torch.zeros(3))
    assert DelayedParamIniter.count_num_params(model) == sum(unique.values())
    assert (
        DelayedParamIniter.count_num_params(model, extra, model.lm_head.weight)
        == sum(unique.values()) + 3
    )
