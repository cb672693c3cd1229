"""smpcheck inside transformers' Trainer and after accelerate's prepare, launched the way users
launch them (``torchrun``, ``accelerate launch``) on 2 CPU gloo ranks, with FSDP really applied
(each report states the share of the parameters a rank holds: 0.5, not 1.0); plus the
comparison page and the in-process logic."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from smpcheck.integrations.loading import RankLoading, loading_verdict, probe_loading
from smpcheck.integrations.outcome import SmpcheckFailed, conclude, failure_sentence
from smpcheck.integrations.transformers import SmpcheckCallback
from smpcheck.report.compare import compare, text_table, write_comparison
from smpcheck.report.model import CheckResult, Finding, Report, Status
from smpcheck.report.units import human_bytes
from tests.console import run_cli
from tests.models import FAMILIES
from tests.releases import needs_accelerate_fsdp, needs_tp_plan

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "integration_ranks.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2"]


def launch(command: list[str], tmp: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a launcher as a user would; a rank that aborts prints every thread's stack."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONFAULTHANDLER": "1",
           "SMPCHECK_CACHE": str(tmp / "cache"),
           "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING", "SMPCHECK_DISABLE"):
        env.pop(key, None)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=timeout)


def per_rank(out: Path, mode: str) -> list[dict]:
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]


def assert_sharded(environment: dict, wrapper: str) -> None:
    """A world of 2 that really sharded holds about half of each parameter per rank."""
    assert environment["wrapper"] == wrapper, environment
    assert 0.4 <= environment["held_share"] <= 0.6, environment


# --- transformers.Trainer -------------------------------------------------------------------

@needs_accelerate_fsdp
def test_trainer_example_checks_the_wrapped_model_then_trains(checkpoints, tmp_path) -> None:
    version = 2  # FSDP1 passes and trains in the collectives test below
    out = launch([*TORCHRUN, str(ROOT / "examples" / "trainer_fsdp.py"),
                  str(checkpoints["llama-gqa-tied"]), "--out", str(tmp_path / "ft"), "--cpu",
                  "--fsdp-version", str(version)], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[example] trained 2 steps" in out.stdout, out.stdout
    assert "verify: " in out.stdout and f"on the fsdp{version}-wrapped model" in out.stdout
    reports = tmp_path / "ft" / "smpcheck"
    data = json.loads((reports / "smpcheck-trainer.json").read_text())
    statuses = {r["name"]: r["status"] for r in data["results"]}
    assert statuses["checkpoint_parity"] == "pass" and statuses["initialised"] == "pass"
    assert all(s in ("pass", "skip") for s in statuses.values()), statuses
    assert_sharded(data["environment"], f"fsdp{version}")
    assert data["environment"]["checkpoint_source"] == "the model's name_or_path"
    assert (reports / "smpcheck-trainer.html").exists()
    assert (reports / "smpcheck-trainer.junit.xml").exists()


@needs_accelerate_fsdp
@pytest.mark.parametrize("version, tensor, check", [
    (2, "model.rotary_emb.inv_freq", "initialised"),
    (1, "model.layers.1.mlp.up_proj.weight", "checkpoint_parity"),
])
def test_trainer_stops_every_rank_before_the_first_step_on_a_planted_fault(
        checkpoints, tmp_path, version, tensor, check) -> None:
    out = launch([*TORCHRUN, str(DRIVER), "trainer-fault", str(checkpoints["llama-gqa-tied"]),
                  str(tmp_path), str(version)], tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    errors = [r["error"] for r in per_rank(tmp_path, "trainer-fault")]
    assert errors[0] == errors[1], "every rank must stop with the same sentence"
    assert f"[{check}] {tensor} (rank 1)" in errors[0], errors[0]
    assert errors[0].count("\n") == 0 and "->" in errors[0], "one sentence, with the fix"
    assert not list(tmp_path.glob("step-rank*")), "an optimizer step ran before the stop"
    report = json.loads((tmp_path / "trainer" / "smpcheck" / "smpcheck-trainer.json").read_text())
    assert not any(r["status"] == "error" for r in report["results"])
    assert_sharded(report["environment"], f"fsdp{version}")


@needs_accelerate_fsdp
def test_trainer_checks_its_save_then_compares_the_resume_with_that_checkpoint(
        checkpoints, tmp_path) -> None:
    """A real Trainer under FSDP2: one step with a save (checked on the save event), then
    ``train(resume_from_checkpoint=True)``: the resumed model is compared with checkpoint-1
    (its weights moved a step from the base model, so passing means it was loaded)."""
    out = launch([*TORCHRUN, str(DRIVER), "trainer-resume", str(checkpoints["llama-gqa-untied"]),
                  str(tmp_path), "2"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for result in per_rank(tmp_path, "trainer-resume"):
        assert result["saves"] == [[True, "full"]], result
        assert result["source"] == f"resumed from {tmp_path / 'run' / 'checkpoint-1'} (full save)"
        assert result["parity"] == "pass" and result["steps"] == 2, result


def test_trainer_under_deepspeed_zero3_is_checked_then_trains(checkpoints, tmp_path) -> None:
    """``TrainingArguments(deepspeed=...)`` with ZeRO-3: the same one-line callback judges
    each rank's partitions (half of every parameter), then training goes on."""
    pytest.importorskip("deepspeed")
    out = launch([*TORCHRUN, str(ROOT / "examples" / "trainer_fsdp.py"),
                  str(checkpoints["llama-gqa-tied"]), "--out", str(tmp_path / "ft"), "--cpu",
                  "--deepspeed", "3"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[example] trained 2 steps" in out.stdout, out.stdout
    data = json.loads((tmp_path / "ft" / "smpcheck" / "smpcheck-trainer.json").read_text())
    statuses = {r["name"]: r["status"] for r in data["results"]}
    for name in ("initialised", "rank_parity", "checkpoint_parity", "coverage", "forward"):
        assert statuses[name] == "pass", statuses
    assert_sharded(data["environment"], "deepspeed-zero3")


def test_trainer_under_deepspeed_zero3_stops_on_a_fault_in_one_partition(
        checkpoints, tmp_path) -> None:
    pytest.importorskip("deepspeed")
    out = launch([*TORCHRUN, str(DRIVER), "trainer-fault", str(checkpoints["llama-gqa-tied"]),
                  str(tmp_path), "zero3"], tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    errors = [r["error"] for r in per_rank(tmp_path, "trainer-fault")]
    assert errors[0] == errors[1], "every rank must stop with the same sentence"
    assert "[checkpoint_parity] model.layers.1.mlp.up_proj.weight (rank 1)" in errors[0]
    assert not list(tmp_path.glob("step-rank*")), "an optimizer step ran before the stop"


@needs_accelerate_fsdp
def test_callback_adds_no_collective_when_disabled_and_one_verify_when_enabled(
        checkpoints, tmp_path) -> None:
    """Under FSDP1: three trainings (no callback, disabled, enabled) counting the calls to
    torch.distributed's collectives; the enabled one also passes its checks and trains on."""
    out = launch([*TORCHRUN, str(DRIVER), "trainer-collectives",
                  str(checkpoints["llama-gqa-tied"]), str(tmp_path), "1"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "reports-enabled" / "smpcheck-trainer.json").read_text())
    assert Report.from_dict(report).ok and report["environment"]["strategy"] == "trainer-fsdp1"
    for counts in per_rank(tmp_path, "trainer-collectives"):
        none, disabled, enabled = counts["none"], counts["disabled"], counts["enabled"]
        assert none["steps"] == disabled["steps"] == enabled["steps"] == 2
        assert_sharded(enabled["report"], "fsdp1")
        assert none["total"] > 0, "the counter must see the Trainer's own collectives"
        assert disabled["total"] == none["total"] and disabled["in_callbacks"] == 0
        assert disabled["report"] is None and not (tmp_path / "reports-disabled").exists()
        assert enabled["in_callbacks"] == enabled["plain_verify"] > 0  # exactly one verify
        # three verifies (two by hand, one by the callback), each the same collectives: the
        # forward check reshards the root unit after its pass, so no verify (and not the
        # Trainer's first step) finds it left gathered by an earlier one
        assert enabled["plain_first"] == enabled["plain_verify"]
        assert enabled["total"] == none["total"] + 3 * enabled["plain_verify"]
        assert enabled["report"]["verify_s"] > 0 and enabled["report"]["trainer_setup_s"] > 0


def callback_on_tp_plan_model(path: str, out: str, break_tie: bool) -> dict:
    """transformers' own ``tp_plan`` model, handed to the callback's event as the Trainer
    would (on CPU accelerate 1.15 refuses Trainer + tp_plan: "ParallelismConfig is only
    compatible with ... but got DistributedType.MULTI_CPU")."""
    from types import SimpleNamespace

    import torch.distributed as dist

    model = T.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    if break_tie and dist.get_rank() == 1:  # lm_head gets its own copy: equal values, no tie
        head = model.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    callback = SmpcheckCallback(report_dir=out)
    try:
        callback.on_train_begin(SimpleNamespace(output_dir=out), SimpleNamespace(global_step=0),
                                None, model=model)
        error = None
    except SmpcheckFailed as exc:
        error = str(exc)
    env = callback.report.environment
    return {"error": error, "wrapper": env["wrapper"], "held_share": env["held_share"],
            "tp_shards": callback.report.result("tp_shards").status.value}


@needs_tp_plan
def test_callback_judges_a_tp_plan_model_and_names_a_broken_tie(ranks, checkpoints,
                                                                 tmp_path) -> None:
    path = str(checkpoints["llama-gqa-tied"])
    clean = ranks(callback_on_tp_plan_model, 2, args=(path, str(tmp_path), False))
    assert clean[0] == {"error": None, "wrapper": "tp", "held_share": clean[0]["held_share"],
                        "tp_shards": "pass"} and clean[0]["held_share"] < 0.75
    broken = ranks(callback_on_tp_plan_model, 2, args=(path, str(tmp_path), True))
    assert broken[0]["error"] == broken[1]["error"] and "(rank 1)" in broken[0]["error"]
    assert "lm_head.weight" in broken[0]["error"], broken[0]["error"]


def callback_on_trained_adapter(path: str, adapter: str, out: str, given: bool) -> dict:
    """A PEFT model loaded from a trained adapter (``lora_B`` no longer zero), handed to the
    callback's event on plain replicas, with and without the adapter's directory."""
    from types import SimpleNamespace

    from peft import PeftModel

    model = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(path), adapter,
                                      is_trainable=True)
    callback = SmpcheckCallback(report_dir=out, adapter=adapter if given else None,
                                on_failure="warn")
    callback.on_train_begin(SimpleNamespace(output_dir=out), SimpleNamespace(global_step=0),
                            None, model=model)
    report = callback.report
    return {"failed": {r.name: sorted({f.tensor.split(".lora_")[-1] for f in r.errors})
                       for r in report.results if r.errors},
            "hints": sorted({f.hint for r in report.results for f in r.errors}),
            "sources": sorted({k for kinds in report.expected["sources"].values() for k in kinds})}


def test_callback_compares_a_trained_adapter_with_its_file(ranks, checkpoints, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    path = str(checkpoints["llama-gqa-untied"])
    trained = get_peft_model(T.AutoModelForCausalLM.from_pretrained(path),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:  # what training leaves: the adapter no longer at identity
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2))
                            * 0.02)
    trained.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    given = ranks(callback_on_trained_adapter, 2, args=(path, adapter, str(tmp_path), True))[0]
    assert given["failed"] == {} and "adapter file" in given["sources"], given
    unsaid = ranks(callback_on_trained_adapter, 2, args=(path, adapter, str(tmp_path), False))[0]
    assert unsaid["failed"] == {"fresh_init": ["B.default.weight"]}, unsaid
    assert any("adapter=" in hint for hint in unsaid["hints"]), unsaid["hints"]


# --- accelerate's FSDP plugin ----------------------------------------------------------------

def accelerate_launch(version: int) -> list[str]:
    """``accelerate launch`` with its FSDP flags, on a free port (port 0 hangs torchrun, and a
    fixed one collides under xdist)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "--use_fsdp", "--fsdp_version", str(version),
            "--fsdp_cpu_ram_efficient_loading", "true",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]


@needs_accelerate_fsdp
@pytest.mark.parametrize("version, launcher, tensor", [
    (2, "accelerate", "model.rotary_emb.inv_freq"),
    (1, "torchrun", "model.layers.1.mlp.up_proj.weight"),
])
def test_accelerate_ram_efficient_loading_passes_then_names_a_planted_fault(
        checkpoints, tmp_path, version, launcher, tensor) -> None:
    prefix = accelerate_launch(version) if launcher == "accelerate" else TORCHRUN
    out = launch([*prefix, str(DRIVER), "accelerate-fault", str(checkpoints["llama-gqa-tied"]),
                  str(tmp_path), str(version)], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    ranks = per_rank(tmp_path, "accelerate-fault")
    for rank in ranks:
        assert rank["plugin"] == {"fsdp_version": version, "cpu_ram_efficient_loading": True}
        assert rank["clean_ok"], rank
        assert_sharded(rank["environment"], f"fsdp{version}")
        assert f"{tensor} (rank 1)" in rank["error"], rank["error"]
    assert ranks[0]["error"] == ranks[1]["error"] and ranks[1]["planted"] == tensor
    clean = json.loads((tmp_path / "clean.json").read_text())
    memory = {r["name"]: r["status"] for r in clean["results"]}["memory"]
    assert memory == "pass" and {p["name"] for p in clean["memory"]["ranks"][1]["phases"]} == {
        "load", "wrap"}
    assert clean["environment"]["loading_verdict"].startswith(f"transformers {T.__version__}: ")


@needs_accelerate_fsdp
@pytest.mark.parametrize("version", [2, 1])
def test_accelerate_example_without_ram_efficient_loading(checkpoints, tmp_path,
                                                          version) -> None:
    out = launch([*TORCHRUN, str(ROOT / "examples" / "accelerate_fsdp.py"),
                  str(checkpoints["llama-gqa-untied"]), "--out", str(tmp_path / "acc"), "--cpu",
                  "--fsdp-version", str(version), "--no-cpu-ram-efficient-loading"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[example] trained 2 steps" in out.stdout
    data = json.loads((tmp_path / "acc" / "smpcheck-accelerate.json").read_text())
    assert Report.from_dict(data).ok, data["results"]
    assert data["environment"]["cpu_ram_efficient_loading"] is False
    assert_sharded(data["environment"], f"fsdp{version}")
    assert "rank 1: read the checkpoint itself" in " ".join(data["environment"]["loading"])


# --- smpcheck run / compare --strategy accelerate-fsdp ---------------------------------------

@needs_accelerate_fsdp
def test_compare_measures_accelerate_beside_ours_with_a_chart(tmp_path) -> None:
    out = run_cli("compare", "--strategies", "accelerate-fsdp,accelerate-fsdp1", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[smpcheck] loading: rank 1: " in out.stdout
    data = json.loads((tmp_path / "reports" / "compare-demo.json").read_text())
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == {"accelerate-fsdp", "accelerate-fsdp1"}
    assert all(r["ok"] and r["ready_s"] > 0 for r in rows.values()), rows
    html = (tmp_path / "reports" / "compare-demo.html").read_text()
    assert 'id="compare-chart"' in html and html.count("<path") > 20
    assert " KiB" in html and " 0 MiB" not in html  # the demo model is 1.1 MiB: 1.1, not 0
    for name in ("accelerate-fsdp", "accelerate-fsdp1"):
        report = json.loads((tmp_path / "reports" / f"smpcheck-{name}-tp1.json").read_text())
        assert {r["name"]: r["status"] for r in report["results"]}["memory"] == "pass"


# --- in-process logic -------------------------------------------------------------------------

def _report(findings: list[Finding], memory: dict | None = None, **env) -> Report:
    status = Status.FAIL if findings else Status.PASS
    return Report([CheckResult("initialised", status, "msg", findings)], env, memory or {})


def test_failure_sentence_names_tensor_rank_fix_and_report(tmp_path) -> None:
    finding = Finding("model.rotary_emb.inv_freq", [1], "differs from a fresh computation",
                      hint="re-initialise non-persistent buffers after loading")
    other = Finding("lm_head.weight", [0, 1], "not tied")
    sentence = failure_sentence(_report([finding, other]), "the model", tmp_path / "r.html")
    assert sentence.startswith("smpcheck: the model is not right: [initialised] "
                               "model.rotary_emb.inv_freq (rank 1): differs")
    assert "-> re-initialise" in sentence and "(and 1 more)" in sentence
    assert sentence.endswith(f"full report: {tmp_path / 'r.html'}") and "\n" not in sentence
    with pytest.raises(SmpcheckFailed, match="inv_freq"):
        conclude(_report([finding]), report_dir=tmp_path, stem="r", on_failure="raise",
                 where="the model")
    assert (tmp_path / "r.html").exists() and (tmp_path / "r.junit.xml").exists()
    with pytest.warns(UserWarning, match="inv_freq"):
        conclude(_report([finding]), report_dir=tmp_path, stem="w", on_failure="warn",
                 where="the model")


def test_disabled_callback_does_nothing_and_bad_options_are_refused(monkeypatch) -> None:
    import smpcheck

    monkeypatch.setattr(smpcheck, "verify", lambda *a, **k: pytest.fail("verify ran"))
    monkeypatch.setenv("SMPCHECK_DISABLE", "1")
    callback = SmpcheckCallback()
    callback.on_init_end(None, None, None)
    callback.on_train_begin(None, None, None, model=torch.nn.Linear(2, 2))
    assert not callback.enabled and callback.report is None
    assert SmpcheckCallback(enabled=True).enabled
    with pytest.raises(ValueError, match="on_failure"):
        SmpcheckCallback(on_failure="ignore")


def test_probe_tells_a_rank_that_read_the_files_from_one_that_did_not(checkpoints) -> None:
    path = checkpoints["llama-gqa-untied"]
    loaded = probe_loading(T.AutoModelForCausalLM.from_pretrained(path), path, 0)
    assert loaded.read_checkpoint and loaded.probed == ["model.embed_tokens.weight",
                                                        "lm_head.weight"]
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    fresh = probe_loading(T.AutoModelForCausalLM.from_config(config_cls(**kwargs)), path, 1)
    assert not fresh.read_checkpoint and "did not read the checkpoint" in fresh.sentence()
    with torch.device("meta"):
        meta_model = T.AutoModelForCausalLM.from_config(config_cls(**kwargs))
    meta = probe_loading(meta_model, path, 1)
    assert meta.meta_share == 1.0 and "on meta" in meta.sentence()
    assert loading_verdict([loaded, meta]) == ("loaded on rank 0 only: the other ranks waited "
                                               "for its broadcast")
    everyone = [loaded, RankLoading(1, 0.0, loaded.probed, True)]
    assert loading_verdict(everyone).startswith("not on rank 0 only: ranks [1]")


def test_tiny_sizes_print_in_kib_and_the_comparison_has_a_chart(tmp_path) -> None:
    assert [human_bytes(n) for n in (300 * 1024, 3 * 2**20, 700 * 2**20, 12 * 2**30)] == [
        "300.0 KiB", "3.0 MiB", "700 MiB", "12.0 GiB"]
    memory = {"ranks": [{"rank": r, "baseline_anon": 100, "phases": [
        {"name": "load", "start": 0.0, "end": 0.5, "peak_anon": 100 + 200 * 1024 * (r + 1)}]}
        for r in (0, 1)], "bounds": []}
    reports = {"naive": _report([], memory, model_bytes=400 * 1024),
               "accelerate-fsdp": _report([], memory, model_bytes=400 * 1024,
                                          loading_verdict="transformers x: not on rank 0 only",
                                          loading=["rank 0: read", "rank 1: read"])}
    data = compare(reports)
    assert data["rows"][1]["rank0"] == 200 * 1024
    table = text_table(data)
    assert "600.0 KiB" in table and "accelerate-fsdp: transformers x: not on rank 0" in table
    html = write_comparison(reports, tmp_path, "c").read_text()
    assert 'id="compare-chart"' in html and "<svg" in html and "400.0 KiB" in html
    assert "rank 1: read" in html and "0 MiB" not in html
