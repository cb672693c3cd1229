"""Release facts decide what smpcheck can run: a strategy a release cannot run here ends in one
sentence (a skip), and one it can run is not refused."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

from smpcheck.run import compat
from smpcheck.strategies.accelerate_fsdp import AccelerateFSDP1, AccelerateFSDP2
from smpcheck.strategies.external import TransformersTPPlan
from tests.console import run_cli


def at(monkeypatch, transformers: str = "5.24.0", accelerate: str = "1.15.0") -> None:
    monkeypatch.setattr(compat, "transformers_version", lambda: Version(transformers))
    monkeypatch.setattr(compat, "accelerate_version", lambda: Version(accelerate))


@pytest.mark.parametrize("release, accelerator, refused", [
    ("4.50.3", False, True), ("4.50.0", True, False), ("4.51.0", False, False),
    ("5.24.0", False, False)])
def test_tp_plan_is_refused_only_where_the_release_needs_an_absent_accelerator(
        monkeypatch, release, accelerator, refused) -> None:
    at(monkeypatch, transformers=release)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    reason = TransformersTPPlan().unavailable()
    assert (reason is not None) == refused, reason
    if refused:
        assert reason.startswith(f"transformers {release}'s tp_plan") and "\n" not in reason
        assert "install transformers>=4.51" in reason


@pytest.mark.parametrize("release, refused", [("1.0.0", True), ("1.5.2", True), ("1.6.0", False)])
def test_accelerate_strategies_need_a_plugin_with_fsdp_version(monkeypatch, release,
                                                               refused) -> None:
    at(monkeypatch, accelerate=release)
    for strategy in (AccelerateFSDP1(), AccelerateFSDP2()):
        reason = strategy.unavailable()
        assert (reason is not None) == refused, reason
        if refused:
            assert f"accelerate {release}'s" in reason and "accelerate>=1.6" in reason


def test_a_plugin_without_fsdp_version_is_fsdp1() -> None:
    class Old:  # accelerate before 1.6
        pass

    class New:
        fsdp_version = 2

    assert compat.fsdp_version_of(Old()) == 1 and compat.fsdp_version_of(New()) == 2


@pytest.mark.skipif(compat.tp_plan_unavailable() is None,
                    reason="this release runs tp_plan here: test_cli runs it for real")
def test_tp_plan_run_on_a_release_that_cannot_is_one_sentence(tmp_path) -> None:
    out = run_cli("run", "--strategy", "tp_plan", tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == [f"[smpcheck] SKIP strategy tp_plan: {compat.tp_plan_unavailable()}"], lines
    assert "Traceback" not in out.stderr, out.stderr
