"""A ranking task's candidates: its distinct train outputs, kept beside each version.

A task with more distinct outputs than ``ranking.max_candidates`` is free text, which the
ranking kind refuses (with the reason) rather than scores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from aftertune.learners.errors import LearnerError

CANDIDATES_FILE = "candidates.json"  # in each ranking adapter dir: its version's candidates
Candidates = Mapping[str, Sequence[str]]


def candidates_of(outputs: Sequence[str], max_candidates: int) -> list[str] | None:
    """A task's candidates (distinct outputs, sorted), or None when it has too many to rank."""
    distinct = sorted({o.strip() for o in outputs if o.strip()})
    return distinct if 0 < len(distinct) <= max_candidates else None


def refusal(task: str, outputs: Sequence[str], max_candidates: int) -> str:
    """Why ``task`` is not ranked: what a report and ``aftertune eval`` say instead of a score."""
    distinct = len({o.strip() for o in outputs if o.strip()})
    return (
        f"task {task!r} has {distinct} distinct outputs, more than ranking.max_candidates="
        f"{max_candidates}: it is free text, which a ranking model cannot answer; use a "
        "generative base model for it, or raise ranking.max_candidates"
    )


def save_candidates(adapter_dir: Path, candidates: Candidates) -> None:
    """Record the candidates a ranking version was trained with, beside its adapter."""
    data = {task: list(answers) for task, answers in sorted(candidates.items())}
    (Path(adapter_dir) / CANDIDATES_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=1))


def load_candidates(adapter_dir: Path) -> dict[str, list[str]]:
    path = Path(adapter_dir) / CANDIDATES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LearnerError(f"cannot read the candidates of {adapter_dir}: {exc}") from exc
    return {str(task): [str(a) for a in answers] for task, answers in data.items()}
