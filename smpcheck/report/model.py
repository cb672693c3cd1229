"""Structured results: a Report holds CheckResults, each holding Findings.

Plain dataclasses that survive ``all_gather_object`` and a JSON round trip, so every rank can
hold the same report and the HTML can be rebuilt from the JSON alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class Status(str, Enum):
    """Outcome of one check; ``worst`` orders them for merging across ranks."""

    PASS = "pass"
    SKIP = "skip"
    FAIL = "fail"
    ERROR = "error"

    @staticmethod
    def worst(statuses: list[Status]) -> Status:
        """Error beats fail beats pass beats skip: a check that ran anywhere is not a skip."""
        order = [Status.ERROR, Status.FAIL, Status.PASS, Status.SKIP]
        return next((s for s in order if s in statuses), Status.SKIP)


@dataclass
class Finding:
    """One thing wrong (or worth a warning), naming the tensor, the ranks and the fix."""

    tensor: str
    ranks: list[int]
    problem: str
    expected: str = ""
    seen: str = ""
    hint: str = ""
    severity: str = "error"  # "error" fails the check; "warning" is reported only

    def sentence(self) -> str:
        ranks = ", ".join(map(str, self.ranks))
        text = f"{self.tensor} (rank{'s' if len(self.ranks) > 1 else ''} {ranks}): {self.problem}"
        if self.expected or self.seen:
            text += f" [expected {self.expected or '?'}, seen {self.seen or '?'}]"
        return text + (f" -> {self.hint}" if self.hint else "")


@dataclass
class CheckResult:
    """A check's verdict on every rank, merged."""

    name: str
    status: Status
    message: str
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    # What raised, when something did: kept for the JSON report; the user sees ``message``.
    traceback: str = ""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


@dataclass
class Report:
    """What :func:`smpcheck.verify` returns, identical on every rank."""

    results: list[CheckResult]
    environment: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    # Where each tensor group's expected value came from, and what each rank read for it.
    expected: dict[str, Any] = field(default_factory=dict)
    log: str = ""  # the log beside the report, when a rank failed: every traceback in full

    @property
    def ok(self) -> bool:
        """True when no check failed or errored (skips are not failures)."""
        return all(r.status in (Status.PASS, Status.SKIP) for r in self.results)

    def result(self, name: str) -> CheckResult:
        return next(r for r in self.results if r.name == name)

    def summary(self) -> str:
        """One line per check, then each error finding: what a terminal shows."""
        lines = [f"{r.status.value.upper():5} {r.name:18} {r.message}" for r in self.results]
        for r in self.results:
            lines += [f"  [{r.name}] {f.sentence()}" for f in r.findings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for r in data["results"]:
            r["status"] = Status(r["status"]).value
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text

    def write_html(self, path: str | Path) -> Path:
        """Write the self-contained HTML report (no network request of any kind)."""
        from smpcheck.report.writers import render_html

        Path(path).write_text(render_html(self))
        return Path(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        results = [
            CheckResult(
                name=r["name"],
                status=Status(r["status"]),
                message=r["message"],
                findings=[Finding(**f) for f in r["findings"]],
                seconds=r.get("seconds", 0.0),
                traceback=r.get("traceback", ""),
            )
            for r in data["results"]
        ]
        return cls(results, data.get("environment", {}), data.get("memory", {}),
                   data.get("expected", {}), data.get("log", ""))

    @classmethod
    def from_json(cls, path: str | Path) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text()))
