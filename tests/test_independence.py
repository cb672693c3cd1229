"""The oracle stays independent: ``smpcheck``'s checks never import ``reference_impl``, and
``reference_impl`` never imports ``smpcheck``, so one bug cannot break the recipe and hide it
from the check at the same time. Only the CLI layer (strategies, job, cli) runs the recipe."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The layer that runs implementations under test; everything else in smpcheck judges them.
RUNS_THE_RECIPE = {"smpcheck/cli.py", "smpcheck/job.py", "smpcheck/strategies"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _files("reference_impl"), ids=lambda p: p.name)
def test_reference_impl_never_imports_smpcheck(path: Path) -> None:
    assert "smpcheck" not in imported_packages(path)


def _judging_files() -> list[Path]:
    return [p for p in _files("smpcheck")
            if not any(str(p.relative_to(ROOT)).startswith(r) for r in RUNS_THE_RECIPE)]


@pytest.mark.parametrize("path", _judging_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_checks_never_import_reference_impl(path: Path) -> None:
    assert "reference_impl" not in imported_packages(path)


def _smpcheck_modules(path: Path) -> set[str]:
    """The smpcheck modules ``path`` imports, as ``smpcheck.<part>`` (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "smpcheck."):
            names.add(".".join(node.module.split(".")[:2]))
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("smpcheck/checks", {"smpcheck.strategies", "smpcheck.job", "smpcheck.cli"}),
    ("smpcheck/report", {"smpcheck.checks", "smpcheck.strategies", "smpcheck.job"}),
    ("smpcheck/strategies", {"smpcheck.checks"}),
])
def test_folders_import_only_downstream(folder: str, forbidden: set[str]) -> None:
    """The judging parts never reach up into the layer that runs a recipe, and the report
    never into the checks that fill it (docs/architecture.md's import table)."""
    for path in _files(folder):
        assert not _smpcheck_modules(path) & forbidden, path
