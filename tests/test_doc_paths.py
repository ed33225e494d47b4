"""The docs point at things a clone has: relative links resolve (anchors too), and every
benchmark command names only paths in the repository or paths a documented command creates."""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINKED_DOCS = [
    REPO / "README.md",
    REPO / "bench" / "README.md",
    REPO / "bench" / "data" / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
]
BENCH_DOCS = [REPO / "docs" / "benchmarks.md", REPO / "bench" / "README.md"]

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(_INLINE_CODE.sub("", line))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        slug = _slug(match.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(doc: Path) -> list[str]:
    broken = []
    for line in _prose_lines(doc.read_text(encoding="utf-8")):
        for match in _LINK.finditer(line):
            target = match.group(1) or match.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    assert not broken_links(doc), f"{doc.relative_to(REPO)}: {broken_links(doc)}"


def test_link_checker_sees_a_broken_link_and_a_wrong_anchor(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# The `b` part (one)\n", encoding="utf-8")
    doc = tmp_path / "a.md"
    doc.write_text(
        "[ok](b.md#the-b-part-one) [gone](c.md) [bad](b.md#nope) `[code](x.md)`\n",
        encoding="utf-8",
    )
    assert broken_links(doc) == [
        "c.md: no such file",
        "b.md#nope: no heading with anchor #nope in b.md",
    ]


# --- benchmark commands ---------------------------------------------------------------------

_COMMAND = re.compile(r"^(\w+=\S+\s+)*(\S*python3?|\S*/bin/\w+|make|git|echo|d=)")
_OUTPUT_OPTIONS = ("--out", "--json", "--markdown")
_MADE_BY_MAKE = (".venv", ".aftertune")  # `make run` / `make .venv`, and aftertune's state dir


def command_lines(text: str) -> list[str]:
    """Shell commands in fenced or indented code blocks, continuation lines joined."""
    lines, fenced, joined = [], False, ""
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        joined += line.strip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            command = joined.split(" #")[0].strip()
            if _COMMAND.match(command):
                lines.append(command)
            joined = ""
    return lines


def missing_paths(commands: list[str]) -> list[str]:
    """Paths a command names that are neither in the repository nor made by a command."""
    made = set(_MADE_BY_MAKE)
    missing = []
    for command in commands:
        words = [w.strip("[]") for w in shlex.split(command.replace("[", " [").replace("]", "] "))]
        for i, word in enumerate(words):
            if word == "venv" and i + 1 < len(words):
                made.add(words[i + 1])
            created = i > 0 and (words[i - 1] in _OUTPUT_OPTIONS or words[i - 1] == ">")
            if created:
                made.add(word.rstrip("/"))
        for i, word in enumerate(words):
            word = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
            if "/" not in word or "://" in word or "$" in word or word.startswith("-"):
                continue
            if i > 0 and (words[i - 1] in _OUTPUT_OPTIONS or words[i - 1] == ">"):
                continue
            if word.startswith(("/usr/", "/bin/")):
                continue
            if any(word == m or word.startswith(m + "/") for m in made):
                continue
            inside = (REPO / word).resolve().is_relative_to(REPO)
            if word.startswith("/") or not inside or not (REPO / word).exists():
                missing.append(f"{word} in: {command}")
    return missing


@pytest.mark.parametrize("doc", BENCH_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_benchmark_commands_name_only_paths_a_clone_has(doc: Path) -> None:
    commands = command_lines(doc.read_text(encoding="utf-8"))
    assert any("bench/" in c for c in commands), "no benchmark command found"
    assert not missing_paths(commands), "\n".join(missing_paths(commands))


def test_path_checker_flags_paths_outside_the_clone() -> None:
    text = (
        "    python bench/tasks.py --out /tmp/x\n"
        "    python bench/gate.py --data /tmp/x \\\n"
        "        --json /tmp/y.json\n"
        "```\n"
        "python bench/ranking.py --data ../shared/datasets --tasks agnews\n"
        "git clone /work/main $d\n"
        "```\n"
    )
    commands = command_lines(text)
    assert len(commands) == 4
    assert [m.split(" in: ")[0] for m in missing_paths(commands)] == [
        "../shared/datasets",
        "/work/main",
    ]
