"""The oracle stays independent: ``smpcheck``'s checks never import ``reference_impl``, and
``reference_impl`` never imports ``smpcheck``, so one bug cannot break the recipe and hide it
from the check at the same time. Only the CLI layer (strategies, job, cli) runs the recipe."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The layer that runs implementations under test; everything else in smpcheck judges them.
# (trailing slash: ``run/`` is not ``runner.py``)
RUNS_THE_RECIPE = {"smpcheck/cli.py", "smpcheck/run/", "smpcheck/strategies/"}


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
    ("smpcheck/checks", {"smpcheck.strategies", "smpcheck.run.job", "smpcheck.cli"}),
    ("smpcheck/report", {"smpcheck.checks", "smpcheck.strategies", "smpcheck.run.job"}),
    ("smpcheck/strategies", {"smpcheck.checks"}),
])
def test_folders_import_only_downstream(folder: str, forbidden: set[str]) -> None:
    """The judging parts never reach up into the layer that runs a recipe, and the report
    never into the checks that fill it (docs/architecture.md's import table)."""
    for path in _files(folder):
        assert not _smpcheck_modules(path) & forbidden, path


def _import_graph() -> dict[str, set[str]]:
    """``{module: smpcheck modules it imports}``, function-level imports included (a lazy
    import is still a dependency), ``if TYPE_CHECKING:`` blocks left out (no import at run
    time), the package root ``smpcheck`` (the public face) left out."""
    modules = {}
    for path in _files("smpcheck"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smpcheck"):
                deps |= {owner(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("smpcheck")}
        graph[name] = deps - {name, "smpcheck", ""}
    return graph


def test_no_module_imports_itself_back() -> None:
    """No import circle: a module that needs another's parts never lends it its own (a
    circle is two modules that are one, split by accident)."""
    graph = _import_graph()
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    circles.append(" -> ".join([*path, start]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
    assert not circles, circles
