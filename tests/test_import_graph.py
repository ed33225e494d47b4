"""The import graph of the packages has no cycles, counting every import statement: at module
level, inside functions and under ``TYPE_CHECKING`` alike (a cycle hidden in a function is
still a cycle). And generic learners code imports no model kind: only the registry does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "daemon": "aftertune.daemon",
    "learners": "aftertune.learners",
    "store": "aftertune.store",
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the aftertune modules it imports (``from a import b`` is ``a.b`` when that is
    a module, else ``a``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_whole() -> None:
    graph = import_graph()
    assert "aftertune.learners.kinds.ranking.objective" in graph
    assert "aftertune.learners.objective" in graph["aftertune.learners.kinds.ranking.objective"]


@pytest.mark.parametrize("package", sorted(PACKAGES.values()))
def test_no_import_cycles(package: str) -> None:
    graph = {m: deps for m, deps in import_graph().items() if m.startswith(package)}
    inside = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    assert cycles(inside) == []


def test_no_import_cycles_across_packages() -> None:
    assert cycles(import_graph()) == []


def test_the_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_generic_learners_code_imports_no_kind() -> None:
    """Only the registry (``kinds/__init__``) and the kinds themselves import a kind's module;
    the rest of learners/ asks through ``model_kind.ModelKind``."""
    kinds = "aftertune.learners.kinds."
    offenders = {
        module: sorted(d for d in deps if d.startswith(kinds))
        for module, deps in import_graph().items()
        if module.startswith("aftertune.learners")
        and not module.startswith(kinds)
        and module != "aftertune.learners.kinds"
    }
    assert {m: d for m, d in offenders.items() if d} == {}
