"""The oracle stays independent: ``smpcheck``'s checks never import ``reference_impl``, and
``reference_impl`` never imports ``smpcheck``, so one bug cannot break the recipe and hide it
from the check at the same time. Only the layer that runs a recipe (``smpcheck/run/``,
``smpcheck/strategies/`` and the console script ``smpcheck/cli.py``) imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The layer that runs implementations under test, by folder (trailing slash: ``run/`` is not
# ``runner.py``); everything else in smpcheck judges them.
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
    """What ``path`` imports of smpcheck, as dotted names (absolute imports only):
    ``from smpcheck.run import whereabouts`` is ``smpcheck.run.whereabouts``, ``from
    smpcheck.memory import Bound`` is ``smpcheck.memory.Bound``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "smpcheck."):
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("smpcheck.")}
    return names


# What each folder may never import, as folders (``smpcheck.run`` is all of ``run/``), and the
# few modules of such a folder it may: the checks mark where a rank is (``whereabouts``, which
# the launcher reads and where a planted fault fires) at every check, nothing else of ``run/``.
UPSTREAM = {"smpcheck.checks", "smpcheck.strategies", "smpcheck.run", "smpcheck.cli"}


@pytest.mark.parametrize("folder, forbidden, allowed", [
    ("smpcheck/checks", UPSTREAM - {"smpcheck.checks"}, {"smpcheck.run.whereabouts"}),
    ("smpcheck/report", UPSTREAM, set()),
    ("smpcheck/strategies", {"smpcheck.checks", "smpcheck.cli"}, set()),
    ("smpcheck/shards", UPSTREAM | {"smpcheck.report", "smpcheck.expect",
                                    "smpcheck.checkpoint"}, set()),
    ("smpcheck/expect", UPSTREAM | {"smpcheck.report"}, set()),
    ("smpcheck/checkpoint", UPSTREAM | {"smpcheck.expect"}, set()),
    ("smpcheck/memory", UPSTREAM, set()),
    ("smpcheck/integrations", {"smpcheck.checks", "smpcheck.strategies", "smpcheck.cli"}, set()),
])
def test_folders_import_only_downstream(folder: str, forbidden: set[str],
                                        allowed: set[str]) -> None:
    """The judging parts never reach up into the layer that runs a recipe, what a rank holds
    and should hold never into the checks that judge it, and the report never into the checks
    that fill it (docs/architecture.md's import table)."""
    for path in _files(folder):
        reached = {m for m in _smpcheck_modules(path)
                   if not any(m == a or m.startswith(f"{a}.") for a in allowed)}
        assert not {".".join(m.split(".")[:2]) for m in reached} & forbidden, path


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
