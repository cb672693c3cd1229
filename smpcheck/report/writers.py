"""Write a Report as self-contained HTML (Jinja2 + an inline matplotlib SVG), JSON and JUnit.

The HTML loads nothing: styles inline, the chart an inline SVG with glyphs as paths, and a
Content-Security-Policy of ``default-src 'none'`` so a browser refuses any request anyway.
Everything user-controlled (model and tensor names) goes through Jinja2's autoescaping.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import Environment, PackageLoader, select_autoescape

from smpcheck.memory.phases import bounded
from smpcheck.report.chart import memory_svg
from smpcheck.report.files import write_atomically

if TYPE_CHECKING:  # Report.write_html calls in here: at run time, no import back
    from smpcheck.report.model import Report
from smpcheck.report.units import human_bytes

MIB = 2**20


def _memory_rows(memory: dict) -> list[dict]:
    bounds = {b["rank"]: b for b in memory.get("bounds", [])}
    rows = []
    for record in memory.get("ranks", []):
        phases = record.get("phases", [])
        worst = max(bounded(phases),
                    key=lambda p: p["peak_anon"], default=None)
        bound = bounds.get(record["rank"])
        peak = worst["peak_anon"] if worst else record["baseline_anon"]
        rows.append(
            {
                "rank": record["rank"],
                "host": record["host"],
                "baseline": f"{record['baseline_anon'] / MIB:.0f} MiB",
                "peak": f"{peak / MIB:.0f} MiB",
                "phase": worst["name"] if worst else "-",
                "kernel": f"{max((p['kernel_peak_rss'] for p in phases), default=0) / MIB:.0f} MiB",
                "file": f"{max((p['peak_file'] for p in phases), default=0) / MIB:.0f} MiB",
                "bound": f"{bound['limit'] / MIB:.0f} MiB" if bound else "-",
                "headroom": f"{(bound['limit'] - peak) / MIB:+.0f} MiB" if bound else "-",
                "ok": bound is None or peak <= bound["limit"],
            }
        )
    return rows


def render_html(report: Report) -> str:
    env = Environment(
        loader=PackageLoader("smpcheck.report", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
    )
    env.filters["human_bytes"] = human_bytes
    data = report.to_dict()
    memory = report.memory or {}
    records = memory.get("ranks", [])
    return env.get_template("report.html.j2").render(
        ok=report.ok,
        verdict="all checks passed" if report.ok else "checks failed",
        results=data["results"],
        env=report.environment,
        expected=report.expected,
        chart=memory_svg(records, memory.get("bounds", [])),
        memory_rows=_memory_rows(memory),
        bounds=memory.get("bounds", []),
        interval_ms=round(records[0]["interval"] * 1000) if records else 0,
    )


def junit_xml(report: Report) -> str:
    suite = ET.Element(
        "testsuite",
        name="smpcheck",
        tests=str(len(report.results)),
        failures=str(sum(r.status == "fail" for r in report.results)),
        errors=str(sum(r.status == "error" for r in report.results)),
        skipped=str(sum(r.status == "skip" for r in report.results)),
    )
    for r in report.results:
        case = ET.SubElement(
            suite, "testcase", classname="smpcheck", name=r.name, time=f"{r.seconds:.3f}"
        )
        details = "\n".join(f.sentence() for f in r.findings)
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.message).text = details
        elif r.status == "error":
            ET.SubElement(case, "error", message=r.message).text = details
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.message)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


def write_reports(report: Report, directory: str | Path, stem: str = "smpcheck") -> dict:
    """Write ``stem.html``, ``stem.json`` and ``stem.junit.xml`` under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "html": directory / f"{stem}.html",
        "json": directory / f"{stem}.json",
        "junit": directory / f"{stem}.junit.xml",
    }
    # JSON first: it is what ``smpcheck report`` and ``compare`` read back. Each file is
    # whole or absent, never half written by a full disk.
    write_atomically(paths["json"], report.to_json())
    write_atomically(paths["html"], render_html(report))
    write_atomically(paths["junit"], junit_xml(report))
    return paths
