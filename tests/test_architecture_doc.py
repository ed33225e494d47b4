"""docs/architecture.md stays true: every module is on the map, every function it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
PACKAGES = ("daemon", "learners", "store")


def _modules(package: str) -> list[str]:
    """Every module of ``package``, a subpackage's as ``sub/module.py``."""
    root = ROOT / package
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.name != "__init__.py"
    )


def _section(package: str) -> str:
    start = DOC.index(f"## `{package}/`")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end]


def test_every_module_has_its_line_in_its_package_section() -> None:
    for package in PACKAGES:
        section = _section(package)
        missing = [m for m in _modules(package) if f"`{m}`" not in section]
        assert not missing, f"docs/architecture.md lacks {package}/ modules {missing}"


def test_every_module_the_map_names_exists() -> None:
    for package in PACKAGES:
        named = re.findall(r"`([a-z_/]+\.py)`", _section(package))
        assert named, package
        # `daemon/specs.py` in another package's section names that package's module.
        gone = [m for m in named if not (ROOT / package / m).is_file() and not (ROOT / m).is_file()]
        assert not gone, f"docs/architecture.md names {package}/ modules that do not exist: {gone}"


def _defined(path: Path) -> set[str]:
    """Top-level functions and classes, and Class.method names, of one module."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(f"{node.name}.{item.name}")
    return names


def test_every_function_on_the_record_path_exists() -> None:
    refs = re.findall(r"`((?:daemon|learners|store)/[a-z_/]+\.py)::([A-Za-z_.]+)`", DOC)
    assert len(refs) >= 15, "the record's path should name the function at each step"
    wrong = [f"{path}::{name}" for path, name in refs if name not in _defined(ROOT / path)]
    assert not wrong, f"docs/architecture.md names functions that do not exist: {wrong}"
