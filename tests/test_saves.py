"""Saves and resumes, verified on real gloo ranks: a resumed run is compared with the Trainer
checkpoint it resumed from (full and DCP saves), and the files a save just wrote are compared
with the live model (a partial or empty adapter file fails, naming the tensor and the file).
The Trainer's events are driven as the Trainer drives them, with its arguments and state."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import transformers as T

import smpcheck
from smpcheck.integrations.outcome import SmpcheckFailed
from smpcheck.integrations.transformers import SmpcheckCallback
from smpcheck.saves import ADAPTER, DCP, FULL, resumed_from, saved_layout
from smpcheck.shards.pieces import iter_pieces
from tests.faults import corrupt

TARGET = "model.layers.0.mlp.up_proj.weight"


def _errors(report: smpcheck.Report) -> dict[str, list[tuple[str, list[int]]]]:
    return {r.name: [(f.tensor, f.ranks) for f in r.errors] for r in report.results
            if r.errors}


def _trained(path: str) -> torch.nn.Module:
    """The model after some training: every weight moved, the same on every rank."""
    model = T.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01)
    return model


def _fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _resume(callback: SmpcheckCallback, model: torch.nn.Module, out: Path, step: int) -> dict:
    try:
        callback.on_train_begin(SimpleNamespace(output_dir=str(out), resume_from_checkpoint=True),
                                SimpleNamespace(global_step=step), None, model=model)
        error = None
    except SmpcheckFailed as exc:
        error = str(exc)
    report = callback.report
    return {"error": error, "source": report.environment["checkpoint_source"],
            "parity": report.result("checkpoint_parity").status.value,
            "errors": _errors(report)}


def resume_full(path: str, out: str, loaded: bool) -> dict:
    """A full save at step 3, then a resume that loaded it (or silently kept the base)."""
    out = Path(out)
    if dist.get_rank() == 0:
        _trained(path).save_pretrained(out / "checkpoint-3")
    dist.barrier()
    model = T.AutoModelForCausalLM.from_pretrained(out / "checkpoint-3" if loaded else path)
    callback = SmpcheckCallback(report_dir=str(out / "reports"), on_failure="warn",
                                checks=["checkpoint_parity", "coverage"])
    return _resume(callback, _fsdp2(model), out, 3)


def test_a_resume_is_compared_with_the_checkpoint_it_resumed_from(ranks, checkpoints,
                                                                  tmp_path) -> None:
    path = str(checkpoints["llama-gqa-untied"])
    good = ranks(resume_full, 2, args=(path, str(tmp_path / "good"), True))[0]
    assert good["parity"] == "pass", good
    assert good["source"] == f"resumed from {tmp_path / 'good' / 'checkpoint-3'} (full save)"
    stale = ranks(resume_full, 2, args=(path, str(tmp_path / "stale"), False))[0]
    assert stale["parity"] == "fail", "a resume that kept the base weights must fail"
    assert len({t for t, _ in stale["errors"]["checkpoint_parity"]}) == 21  # all moved


def resume_dcp(path: str, out: str) -> dict:
    """FSDP's sharded save (DCP inside a Trainer checkpoint folder), a resume that loaded it,
    and one element changed on rank 1 after the load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    out = Path(out)
    saved = _fsdp2(_trained(path))
    dcp.save({"model": get_model_state_dict(saved)},
             checkpoint_id=str(out / "checkpoint-2" / "pytorch_model_fsdp_0"))
    model = _fsdp2(T.AutoModelForCausalLM.from_pretrained(path))
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(out / "checkpoint-2" / "pytorch_model_fsdp_0"))
    set_model_state_dict(model, state["model"])
    callback = SmpcheckCallback(report_dir=str(out / "reports"), on_failure="warn",
                                checks=["checkpoint_parity", "coverage"])
    clean = _resume(callback, model, out, 2)
    if dist.get_rank() == 1:
        corrupt(next(p for p in iter_pieces(model) if p.name == TARGET).data, "epsilon")
    planted = _resume(SmpcheckCallback(report_dir=str(out / "reports"), on_failure="warn",
                                       checks=["checkpoint_parity"]), model, out, 2)
    return {"clean": clean, "planted": planted}


def test_a_resume_from_fsdp_sharded_dcp_is_compared_and_a_change_named(ranks, checkpoints,
                                                                       tmp_path) -> None:
    out = ranks(resume_dcp, 2, args=(str(checkpoints["llama-gqa-untied"]), str(tmp_path)))[0]
    assert out["clean"]["parity"] == "pass", out["clean"]
    assert out["clean"]["source"].endswith("checkpoint-2 (dcp save)")
    assert out["planted"]["errors"] == {"checkpoint_parity": [(TARGET, [1])]}, out["planted"]


def adapter_saves(path: str, out: str) -> dict:
    """A LoRA model under FSDP2 saved three ways: whole (each adapter gathered), with rank 0's
    local shards only, and as an empty file; each save checked against the live model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    out = Path(out)
    model = get_peft_model(T.AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # trained: lora_B no longer zero, the same on every rank
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.linspace(-1, 1, param.numel()).reshape(param.shape))
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    adapters = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    whole = {n: p.full_tensor().contiguous() for n, p in adapters.items()}
    local = {n: p.to_local().contiguous() for n, p in adapters.items()}
    results = {}
    for case, tensors in (("whole", whole), ("rank0-slice", local), ("empty", {})):
        folder = out / case
        if dist.get_rank() == 0:
            folder.mkdir(parents=True)
            save_file(tensors, str(folder / "adapter_model.safetensors"))
            model.peft_config["default"].save_pretrained(str(folder))
        report = smpcheck.verify_saved(model, folder, base_checkpoint=path)
        results[case] = _errors(report)
    callback = SmpcheckCallback(check_saves=True, checkpoint=path,
                                report_dir=str(out / "reports"))
    (out / "checkpoint-7").mkdir(exist_ok=True)
    if dist.get_rank() == 0:
        save_file({}, str(out / "checkpoint-7" / "adapter_model.safetensors"))
    try:
        callback.on_save(SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=7),
                         None, model=model)
        results["event"] = None
    except SmpcheckFailed as exc:
        results["event"] = str(exc)
    return results


def test_every_adapter_save_is_compared_with_the_live_model(ranks, checkpoints,
                                                            tmp_path) -> None:
    pytest.importorskip("peft")
    out = ranks(adapter_saves, 2, args=(str(checkpoints["llama-gqa-untied"]), str(tmp_path)))
    assert out[0] == out[1], "every rank holds the same verdict"
    results = out[0]
    assert results["whole"] == {}, results["whole"]
    sliced = results["rank0-slice"]
    # Every adapter is stored at rank 0's shard shape: coverage names all 8 on both ranks;
    # what rank 1 holds is not in the file at all.
    assert len(sliced["coverage"]) == 8, sliced
    assert all(".lora_" in tensor and ranks == [0, 1] for tensor, ranks in sliced["coverage"])
    assert any(ranks == [1] for _, ranks in sliced["checkpoint_parity"]), sliced
    empty = results["empty"]["checkpoint_parity"]
    assert len(empty) == 8 and all(".lora_" in tensor for tensor, _ in empty), empty
    event = results["event"]
    assert event is not None and "saved at step 7" in event and "lora_" in event, event
    assert "not in the adapter file" in event and "checkpoint-7" in event, event


def test_layouts_and_the_resumed_folder(tmp_path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").touch()
    (tmp_path / "sharded" / "pytorch_model_fsdp_0").mkdir(parents=True)
    (tmp_path / "sharded" / "pytorch_model_fsdp_0" / ".metadata").touch()
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_model.safetensors").touch()
    assert [saved_layout(tmp_path / n) for n in ("full", "sharded", "lora")] == [FULL, DCP,
                                                                                  ADAPTER]
    assert saved_layout(tmp_path) is None
    (tmp_path / "checkpoint-5").mkdir()
    assert resumed_from(tmp_path, 5, True) == tmp_path / "checkpoint-5"
    assert resumed_from(tmp_path, 5, str(tmp_path / "full")) == tmp_path / "full"
    assert resumed_from(tmp_path, 6, None) is None
    with pytest.raises(ValueError, match="holds no model weights"):
        smpcheck.verify_saved(torch.nn.Linear(2, 2), tmp_path)
