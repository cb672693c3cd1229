"""The pure parts of how a run meets and reports a fault, in process: the planted-fault knob,
the damage it does, a checkpoint that moved, files written whole or not at all, where ranks
were, and the closing sentence made from the launcher's record."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from smpcheck.checkpoint import changed_files, file_identities
from smpcheck.report.files import write_atomically
from smpcheck.run import endings, faults, whereabouts


def test_the_knob_parses_or_says_what_it_expects(monkeypatch) -> None:
    monkeypatch.delenv(faults.FAULT, raising=False)
    assert faults.planted() is None
    monkeypatch.setenv(faults.FAULT, "kill:1:coverage")
    assert faults.planted() == faults.Planted("kill", 1, "coverage")
    for bad in ("explode:1:load", "kill:one:load", "kill:1"):
        monkeypatch.setenv(faults.FAULT, bad)
        with pytest.raises(ValueError, match="KIND:RANK:PHASE"):
            faults.planted()


def test_damage_is_exact_and_keeps_the_header() -> None:
    data = (4).to_bytes(8, "little") + b"{}  " + bytes(range(16))
    assert faults.damaged("truncate", data) == data[:14]
    replaced = faults.damaged("replace", data)
    assert replaced[:12] == data[:12] and len(replaced) == len(data)
    assert all(a != b for a, b in zip(replaced[12:], data[12:]))


def test_a_checkpoint_that_moved_is_seen_in_every_way(tmp_path) -> None:
    for name in ("a.safetensors", "b.safetensors", "c.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"x" * 64)
    before = file_identities(tmp_path)
    assert changed_files(before, tmp_path) == []
    os.truncate(tmp_path / "a.safetensors", 32)
    (tmp_path / "new").write_bytes(b"y" * 64)
    os.replace(tmp_path / "new", tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").unlink()
    stat = (tmp_path / "config.json").stat()
    os.utime(tmp_path / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert changed_files(before, tmp_path) == [
        ("a.safetensors", "changed size from 64 to 32 bytes"),
        ("b.safetensors", "was replaced (another file now has its name)"),
        ("c.safetensors", "is gone"),
        ("config.json", "was rewritten")]
    assert changed_files(before, tmp_path / "gone") == [(str(tmp_path / "gone"), "is gone")]


def _refusing_writes(monkeypatch, root: Path, code: int) -> None:
    monkeypatch.setattr(builtins, "open", builtins.open)  # restored after the test
    monkeypatch.setattr(io, "open", io.open)
    faults._fail_opens(root, code, writes=True)


def test_a_refused_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch) -> None:
    target = tmp_path / "report.json"
    write_atomically(target, "old")
    _refusing_writes(monkeypatch, tmp_path, errno.ENOSPC)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_the_job_says_its_verdict_when_the_report_cannot_be_written(tmp_path, monkeypatch,
                                                                    capsys) -> None:
    from smpcheck.report.model import CheckResult, Report, Status
    from smpcheck.run.job import EXIT_NO_REPORT, Outputs

    _refusing_writes(monkeypatch, tmp_path, errno.EROFS)
    passed = Report([CheckResult("preflight", Status.PASS, "same")], {}, {})
    assert Outputs(str(tmp_path), "run").write(passed) == EXIT_NO_REPORT
    said = capsys.readouterr().err.strip()
    assert said.startswith("smpcheck: every check passed; the report could not be written to")
    assert "Read-only file system" in said
    failed = Report([CheckResult("coverage", Status.FAIL, "a row short")], {}, {})
    assert Outputs(str(tmp_path), "run").write(failed, log="tracebacks") == 1
    assert "coverage failed: a row short; the report could not be written" in (
        capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_whereabouts_say_the_phase_and_check(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(whereabouts.RUN_STATE, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv(faults.FAULT, raising=False)
    whereabouts.enter("check")
    whereabouts.within("coverage")
    assert whereabouts.current() == "check (coverage)"
    assert whereabouts.last_known(tmp_path) == {
        3: {"phase": "check", "detail": "coverage", "pid": os.getpid()}}
    whereabouts.enter("report")
    assert whereabouts.current() == "report"


def _failure(rank: int, exitcode: int, message: str = "") -> ProcessFailure:
    failure = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="")
    failure.message = message
    return failure


def test_a_rank_killed_by_a_signal_is_named_with_its_phase_and_likely_cause() -> None:
    where = {0: {"phase": "wrap", "detail": ""}, 1: {"phase": "check", "detail": "coverage"}}
    ending = endings.of_failed_ranks({1: _failure(1, -signal.SIGKILL)}, where, {}, 60, "x.log")
    assert ending.code == 1
    assert ending.sentence == (
        "rank 1 was killed by SIGKILL (the kernel's out-of-memory killer sends SIGKILL: see "
        "`dmesg`) in check (coverage), before a report was written")
    assert [(f.rank, f.phase, f.error) for f in ending.failures] == [
        (1, "check (coverage)", "SIGKILL")]
    bus = endings.of_failed_ranks({0: _failure(0, -signal.SIGBUS)}, where, {}, 60, "x.log")
    assert "SIGBUS" in bus.sentence and "truncated or replaced" in bus.sentence
    exited = endings.of_failed_ranks({0: _failure(0, 7, "ValueError: bad\nmore")}, where, {},
                                     60, "x.log")
    assert exited.sentence == ("rank 0 failed (exit code 7) in wrap before a report was "
                               "written: ValueError: bad; the launcher's messages are in x.log")


def test_a_peer_losing_its_connection_is_not_the_cause() -> None:
    failures = {0: _failure(0, 1, "RuntimeError: Connection closed by peer"),
                1: _failure(1, 2, "KeyError: 'x'")}
    failures[0].timestamp, failures[1].timestamp = 1, 2
    assert endings.of_failed_ranks(failures, {}, {}, 60, "").sentence.startswith(
        "rank 1 failed (exit code 2) in start")


def test_rank_0_without_a_report_directory_ends_the_run_with_its_own_sentence() -> None:
    ending = endings.of_failed_ranks({0: _failure(0, endings.EXIT_NO_REPORT)}, {}, {}, 60, "")
    assert ending.code == endings.EXIT_NO_REPORT and ending.sentence == ""


def test_a_preempted_job_names_where_each_rank_was() -> None:
    where = {0: {"phase": "load", "detail": ""}, 1: {"phase": "start", "detail": ""}}
    ending = endings.of_signalled_job(signal.SIGTERM, where)
    assert ending.code == 143
    assert ending.sentence == ("the job was stopped by SIGTERM (preempted or cancelled) with "
                               "rank 0 in load, rank 1 in start; no check verdict")
    assert json.dumps([f.phase for f in ending.failures]) == '["load", "start"]'
