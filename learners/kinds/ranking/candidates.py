"""A ranking task's candidates: its distinct train outputs, kept beside each version.

A task with more distinct outputs than ``ranking.max_candidates`` is free text, which the
ranking kind refuses (with the reason) rather than scores.

Each candidate also carries **exemplars**: a seeded sample of the rendered prompts of its
train records. A candidate's anchor (what a prompt's embedding is compared with) is the
normalised mean embedding of its exemplars, its class prototype, and the embedding of the
answer text only where no exemplar was drawn. The answer text alone says too little on
tasks whose labels are near in meaning ("negative" / "very negative") or opaque ("POS"):
measured in docs/benchmarks.md, the prototypes of the frozen encoder beat its label texts on
every single-text task there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from aftertune.learners.data import ExampleLike
from aftertune.learners.errors import LearnerError
from aftertune.store.files import write_atomic
from aftertune.store.prompt import PromptTemplate
from aftertune.store.records import rating_of

CANDIDATES_FILE = "candidates.json"  # in each ranking adapter dir: its version's candidates
EXEMPLARS_FILE = "exemplars.json"  # beside it: each candidate's exemplar prompts
Candidates = Mapping[str, Sequence[str]]
Exemplars = Mapping[str, Mapping[str, Sequence[str]]]  # task -> answer -> rendered prompts


class AnswerSet(tuple[str, ...]):
    """A task's candidates (sorted) with each one's exemplar prompts (maybe none).

    A tuple of the answers, so it is a candidate list wherever one is expected; the
    exemplars ride along for the code that builds anchors (objective, scoring, export)."""

    exemplars: Mapping[str, tuple[str, ...]]

    def __new__(
        cls, answers: Sequence[str], exemplars: Mapping[str, Sequence[str]] | None = None
    ) -> AnswerSet:
        made = super().__new__(cls, answers)
        given = exemplars or {}
        made.exemplars = {a: tuple(given.get(a, ())) for a in made}
        return made


def answer_set(
    answers: Sequence[str], examples: Sequence[ExampleLike], template: PromptTemplate
) -> AnswerSet:
    """``answers`` with the rendered prompts of those ``examples`` whose output is one; a
    thumbs-down (its output is the answer a user said is wrong) is no exemplar of it."""
    found: dict[str, list[str]] = {}
    for ex in examples:
        if rating_of(getattr(ex, "meta", None) or {}) == "down":
            continue
        found.setdefault(ex.output.strip(), []).append(template.render(ex.instruction, ex.input))
    return AnswerSet(answers, found)


def exemplars_of(sets: Mapping[str, Sequence[str] | None]) -> dict[str, dict[str, list[str]]]:
    """Each task's exemplars, from answer sets that carry them (plain lists carry none)."""
    return {
        task: {a: list(p) for a, p in found.exemplars.items() if p}
        for task, found in sets.items()
        if isinstance(found, AnswerSet)
    }


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


def save_exemplars(adapter_dir: Path, exemplars: Exemplars) -> None:
    """Record each candidate's exemplar prompts: the bundle's anchors are built from them."""
    data = {t: {a: list(p) for a, p in sorted(e.items())} for t, e in sorted(exemplars.items())}
    write_atomic(Path(adapter_dir) / EXEMPLARS_FILE, json.dumps(data, ensure_ascii=False).encode())


def load_exemplars(adapter_dir: Path) -> dict[str, dict[str, list[str]]]:
    """A version's exemplars; none for a version trained before they were kept (its bundle
    then anchors each candidate at its answer text, as such versions were trained to)."""
    path = Path(adapter_dir) / EXEMPLARS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LearnerError(f"cannot read the exemplars of {adapter_dir}: {exc}") from exc
    return {
        str(t): {str(a): [str(p) for p in prompts] for a, prompts in by_answer.items()}
        for t, by_answer in data.items()
    }


def with_exemplars(candidates: Candidates, exemplars: Exemplars) -> dict[str, AnswerSet]:
    """Candidates as answer sets carrying their exemplars (what export reads back)."""
    return {t: AnswerSet(a, exemplars.get(t)) for t, a in candidates.items()}


def load_candidates(adapter_dir: Path) -> dict[str, list[str]]:
    path = Path(adapter_dir) / CANDIDATES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LearnerError(f"cannot read the candidates of {adapter_dir}: {exc}") from exc
    return {str(task): [str(a) for a in answers] for task, answers in data.items()}
