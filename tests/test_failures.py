"""The failure protocol's pure parts, in process: records through a real store, the cause
among several failed ranks, and the FAIL lines the report gets. The whole protocol (a rank
failing, its peers stuck in a collective, the report written) runs in tests/test_cli.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from smpcheck.report.model import Report, Status
from smpcheck.run.failures import (
    POLL_S,
    FailureBoard,
    FailureProtocol,
    RankFailure,
    cause,
    failure_results,
    tensor_problems,
)
from smpcheck.run.job import Progress

PARAM_INIT = ("rank 2: 2 problems in LlamaForCausalLM after delayed parameter init:\n"
              "  model.layers.1.mlp.up_proj.weight: contains NaN or Inf\n"
              "  model.norm.weight: still on the meta device (param_init_fn never reached "
              "its module: ignored by FSDP, or outside every wrapped unit?)")


def failure(rank: int, at: float, message: str = "boom", phase: str = "wrap",
            error: str = "RuntimeError") -> RankFailure:
    return RankFailure(rank, phase, error, message, f"Traceback of rank {rank}\n", at,
                       tensor_problems(message) if error == "ParamInitError" else [])


def test_param_init_error_lines_become_tensor_problems() -> None:
    assert tensor_problems(PARAM_INIT) == [
        ("model.layers.1.mlp.up_proj.weight", "contains NaN or Inf"),
        ("model.norm.weight", "still on the meta device (param_init_fn never reached its "
                              "module: ignored by FSDP, or outside every wrapped unit?)"),
    ]
    assert tensor_problems("one line only") == []


def test_summary_is_the_first_line_without_the_rank() -> None:
    assert failure(2, 0, PARAM_INIT, error="ParamInitError").summary == (
        "ParamInitError: 2 problems in LlamaForCausalLM after delayed parameter init")
    assert failure(0, 0, "").summary == "RuntimeError"


def test_the_cause_is_not_a_peer_that_lost_its_connection() -> None:
    lost = failure(0, 1.0, "Connection closed by peer [127.0.0.1]:1234")
    real = failure(3, 2.0, "CUDA out of memory")
    assert cause([lost, real]) is real
    assert cause([failure(2, 5.0), failure(1, 5.0)]).rank == 1  # same instant: lowest rank


def test_one_fail_line_per_phase_with_tensors_merged_across_ranks() -> None:
    failures = [failure(r, 1.0 + r, PARAM_INIT.replace("rank 2", f"rank {r}"),
                        error="ParamInitError") for r in (1, 2, 3)]
    failures.append(failure(0, 9.0, "Connection reset by peer", phase="check"))
    wrap, check = failure_results(failures)
    assert (wrap.name, wrap.status, check.name) == ("wrap", Status.FAIL, "check")
    assert wrap.message == ("rank 1 failed in wrap: ParamInitError: 2 problems in "
                            "LlamaForCausalLM after delayed parameter init (ranks 2, 3 too)")
    assert [(f.tensor, f.ranks) for f in wrap.findings] == [
        ("model.layers.1.mlp.up_proj.weight", [1, 2, 3]), ("model.norm.weight", [1, 2, 3])]
    assert "--- rank 1, phase wrap" in wrap.traceback and "Traceback of rank 3" in (
        wrap.traceback)
    assert check.findings == []  # a generic exception: the message says it all


def test_report_with_a_failed_phase_round_trips_through_json(tmp_path) -> None:
    report = Report(failure_results([failure(1, 1.0)]), {"strategy": "smp"}, {},
                    str(tmp_path / "x.log"))
    report.to_json(tmp_path / "r.json")
    again = Report.from_json(tmp_path / "r.json")
    assert not again.ok and again.log == report.log
    assert again.results[0].traceback == report.results[0].traceback


def test_report_json_without_the_new_fields_still_loads(tmp_path) -> None:
    """Reports written before tracebacks and logs existed."""
    (tmp_path / "old.json").write_text('{"results": [{"name": "preflight", "status": "pass", '
                                       '"message": "ok", "findings": []}]}')
    old = Report.from_json(tmp_path / "old.json")
    assert old.ok and old.log == "" and old.results[0].traceback == ""


def test_board_round_trips_records_through_a_store(tmp_path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    board = FailureBoard(dist.PrefixStore("smpcheck/0/", store), world_size=4)
    assert not board.any_failed() and not board.reported()
    posted = failure(2, 3.0, PARAM_INIT, error="ParamInitError")
    board.post(posted)
    assert board.any_failed() and board.failures() == [posted]
    board.mark_reported()
    assert board.reported()


class SlowBoard:
    """A board whose store answers slowly, as a loaded c10d store does."""

    def __init__(self) -> None:
        self.calls = 0

    def any_failed(self) -> bool:
        self.calls += 1
        time.sleep(POLL_S * 2)
        return False


def test_leaving_the_watched_block_waits_for_the_watcher() -> None:
    """No watcher may outlive the block: one still inside a store call when the interpreter
    exits aborts the rank (it did, in CI, after every check had passed)."""
    board = SlowBoard()
    with FailureProtocol(board, rank=1, write_report=lambda failures: None).watching():
        while board.calls == 0:  # the watcher is now inside its slow call
            time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "smpcheck-failure-watcher"]


@pytest.mark.parametrize(("names", "done", "running"), [
    (("load", "wrap"), [], "load"), (("load", "wrap"), ["load"], "wrap"),
    (("load", "transform", "wrap"), ["load"], "transform"),
    (("load", "transform", "wrap"), ["load", "transform"], "wrap"),
    (("load",), [], "load"), (("load",), ["load"], "load"),  # streaming: load is all of it
    (("load", "wrap"), ["load", "wrap"], "wrap"),  # the strategy finishing after its last
])
def test_a_failure_is_charged_to_the_phase_running(names, done, running) -> None:
    progress = Progress(names, done=list(done))
    progress.strategy_phase()
    assert progress.phase == running


def test_a_strategy_yielding_a_phase_it_did_not_declare_is_a_bug_named() -> None:
    progress = Progress(("load", "wrap"))
    progress.finished("load")
    with pytest.raises(RuntimeError, match="yielded phase 'transform' where it declared 'wrap'"):
        progress.finished("transform")
