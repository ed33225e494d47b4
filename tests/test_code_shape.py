"""The house rules that a reviewer would otherwise re-check by hand (STYLE.md, issue 11)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "learners", "store")
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_function_over_60_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}::{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"split into named steps: {long}"


def test_no_formatter_escapes() -> None:
    skips = [str(p.relative_to(ROOT)) for p in _sources() if "# fmt: skip" in p.read_text()]
    assert not skips, f"`# fmt: skip` hides a call too long to read: {skips}"
