"""The memory monitor sees planted spikes on the right rank and phase; the bound check names an
excess; the HTML report renders offline in headless Chromium; JSON and JUnit round-trip."""

from __future__ import annotations

import json
import shutil
import time
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.distributed as dist

import smpcheck
from smpcheck.checkpoint import Checkpoint
from smpcheck.checks import ALL_CHECKS
from smpcheck.memory import MemoryMonitor, ModelSize, memory_bound
from smpcheck.report.model import Report
from smpcheck.report.writers import write_reports

MIB = 2**20
SPIKE = 256 * MIB
TOLERANCE = 0.10  # of the spike: allocator and page-table overhead on top of the data


def spike_on_rank1(hold_s: float) -> dict:
    """Phase 'calm' on every rank, then phase 'spike' where rank 1 allocates SPIKE bytes."""
    rank = dist.get_rank()
    with MemoryMonitor(rank=rank, interval=0.005) as mon:
        with mon.phase("calm"):
            time.sleep(0.05)
        with mon.phase("spike") as phase:
            start_anon = mon.record.samples[-1][1]
            if rank == 1:
                block = torch.ones(SPIKE // 4)  # written: every page is resident
                time.sleep(hold_s)
                del block
            time.sleep(0.05)
    calm, spike = mon.record.phase("calm"), mon.record.phase("spike")
    return {"sampled": spike.peak_anon - start_anon,
            "kernel": phase.kernel_peak_rss - phase.start_rss,
            "calm_growth": calm.peak_anon - mon.record.baseline_anon,
            "missed": spike.spike_missed_by_sampling, "resets": mon.record.kernel_peak_resets}


def test_planted_spike_is_seen_on_its_rank_and_phase(ranks) -> None:
    quiet, loud = ranks(spike_on_rank1, 2, args=(0.2,))
    assert abs(loud["sampled"] - SPIKE) <= TOLERANCE * SPIKE, loud
    assert quiet["sampled"] < TOLERANCE * SPIKE, quiet
    assert loud["calm_growth"] < TOLERANCE * SPIKE


def test_spike_shorter_than_sampling_still_shows_in_the_kernel_peak(ranks) -> None:
    _, loud = ranks(spike_on_rank1, 2, args=(0.0,))
    if not loud["resets"]:
        pytest.skip("this kernel does not allow resetting VmHWM (clear_refs 5)")
    assert abs(loud["kernel"] - SPIKE) <= TOLERANCE * SPIKE, loud


def excess_over_bound(extra_mib: int) -> dict:
    rank = dist.get_rank()
    model = torch.nn.Linear(256, 256)
    with MemoryMonitor(rank=rank) as mon:
        with mon.phase("load"):
            time.sleep(0.02)
        with mon.phase("wrap"):
            if rank == 1:
                block = torch.ones(extra_mib * MIB // 4)
                time.sleep(0.1)
                del block
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = memory_bound(rank=rank, baseline=mon.record.baseline_anon,
                         size=ModelSize(model_bytes, model_bytes, model_bytes),
                         strategy="fsdp2", world_size=2)
    report = smpcheck.verify(model, checks=["memory"], memory=(mon.record, bound))
    result = report.results[0]
    return {"status": result.status.value, "findings": [f.sentence() for f in result.errors],
            "ranks": [f.ranks for f in result.errors], "memory": report.memory}


def test_excess_over_the_bound_fails_naming_rank_phase_and_amount(ranks) -> None:
    out = ranks(excess_over_bound, 2, args=(200,))[0]
    assert out["status"] == "fail" and out["ranks"] == [[1]]
    sentence = out["findings"][0]
    assert "phase 'wrap'" in sentence and "exceeds the bound by" in sentence
    excess = int(sentence.split("exceeds the bound by ")[1].split(" MiB")[0])
    assert 200 - 64 - 20 <= excess <= 200 - 64 + 20, sentence  # 64 MiB slack in the bound
    assert len(out["memory"]["ranks"]) == 2 and len(out["memory"]["bounds"]) == 2
    quiet = ranks(excess_over_bound, 2, args=(16,))[0]
    assert quiet["status"] == "pass", quiet


def recipe_report(path: str, out_dir: str) -> str:
    from reference_impl import DelayedParamIniter, apply_fsdp1, load_on_rank0

    rank = dist.get_rank()
    with MemoryMonitor(rank=rank) as mon:
        with mon.phase("load"):
            model = load_on_rank0(path)
        with mon.phase("wrap"):
            initer = DelayedParamIniter(model, device="cpu") if rank else None
            model = apply_fsdp1(model, device="cpu", initer=initer)
    bound = memory_bound(rank=rank, baseline=mon.record.baseline_anon,
                         size=Checkpoint(path).sizes(), strategy="smp", world_size=2)
    report = smpcheck.verify(model, checkpoint=path, memory=(mon.record, bound),
                             environment_extra={"model": "<b>tiny</b> & llama"})
    if rank == 0:
        write_reports(report, out_dir, "run")
    return report.summary()


def test_report_of_a_real_run_round_trips(ranks, checkpoints, tmp_path) -> None:
    ranks(recipe_report, 2, args=(str(checkpoints["llama-gqa-tied"]), str(tmp_path)))
    data = json.loads((tmp_path / "run.json").read_text())
    report = Report.from_json(tmp_path / "run.json")
    assert report.ok and report.to_dict() == data
    html = (tmp_path / "run.html").read_text()
    assert "&lt;b&gt;tiny&lt;/b&gt; &amp; llama" in html and "<b>tiny</b>" not in html
    assert report.write_html(tmp_path / "rebuilt.html").read_text() == html
    suite = ET.parse(tmp_path / "run.junit.xml").getroot()
    assert suite.get("tests") == str(len(report.results)) and suite.get("failures") == "0"
    assert {c.get("name") for c in suite} == {r.name for r in report.results}


def test_html_renders_offline_in_headless_chromium(ranks, checkpoints, tmp_path) -> None:
    chromium = shutil.which("chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    if chromium is None:
        pytest.skip("Debian chromium is not installed")
    ranks(recipe_report, 2, args=(str(checkpoints["llama-gqa-tied"]), str(tmp_path)))
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.on("request", lambda r: requests.append(r.url))
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            "file://") else route.abort())
        page.goto((tmp_path / "run.html").as_uri())
        chart_paths = page.locator("#memory-chart svg path").count()
        check_rows = page.locator("#checks tr").count()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert requests == [(tmp_path / "run.html").as_uri()], requests
    assert chart_paths > 20, "the memory chart did not render"
    assert check_rows == 1 + len(ALL_CHECKS)
    assert (tmp_path / "report.png").stat().st_size > 20_000
