"""Evaluation's shared parts: a task's scores, the metrics, and which held-out records count.

Every model kind scores into ``TaskScore`` (the generative kind in
``kinds/generative/scoring.py``, the ranking kind in ``kinds/ranking/scoring.py``). The
metrics: exact match (normalised) for label tasks, SQuAD-style token F1 and exact match for
free text (in any language: a CJK character is one token, as Chinese reading-comprehension
benchmarks count it, and Unicode punctuation is dropped). ``held_out`` picks the records the
gate and ``aftertune eval`` judge on, the first ``eval.max_per_task`` of each task.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from aftertune.learners.spec_config import SPEC_CONFIG
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.prompt import PromptTemplate

TaskKindName = Literal["label", "text"]

DEFAULT_MAX_LENGTH = 512  # tokens of prompt + answer; byte-level, so ~500 characters


@dataclass(frozen=True)
class TaskScore:
    """One task's scores. accuracy/token_f1/valid are shares in [0, 1]; nll is nats per token."""

    task: str
    kind: TaskKindName
    n: int
    accuracy: float | None
    token_f1: float | None
    nll: float
    valid: float | None
    exact_match: float | None = None  # free text: normalised answer equals the reference

    @property
    def score(self) -> float:
        """The headline figure in [0, 1]: accuracy for label tasks, token F1 for free text."""
        value = self.accuracy if self.kind == "label" else self.token_f1
        return 0.0 if value is None else value


# --- text normalisation and metrics -------------------------------------------------------

_SPACES = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Scripts written without spaces between words: each character is a token (CMRC 2018's and
# DuReader's mixed segmentation). CJK ideographs (with extensions and compatibility forms),
# kana, Hangul syllables.
_CJK = re.compile(
    "([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f])"
)


def normalize(text: str) -> str:
    """Exact-match normalisation: strip, casefold, collapse runs of whitespace."""
    return _SPACES.sub(" ", text.strip().casefold())


def _is_punctuation(char: str) -> bool:
    # Unicode's P* categories ("，", "。", "？", "«") plus ASCII's symbols SQuAD drops too.
    return unicodedata.category(char).startswith("P") or char in string.punctuation


def _squad_tokens(text: str) -> list[str]:
    # SQuAD's normalize_answer (lower case, no punctuation, no articles, single spaces), with
    # punctuation of every script removed and each CJK character a token of its own.
    text = "".join(" " if _is_punctuation(c) else c for c in text.casefold())
    return _CJK.sub(r" \1 ", _ARTICLES.sub(" ", text)).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both answers have the same tokens in the same order (:func:`token_f1`'s)."""
    return float(_squad_tokens(prediction) == _squad_tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 (bag of tokens; a CJK character is a token); two empty answers
    agree (SQuAD v2 rule). '医生' vs '一名医生' scores 2/3, not 0."""
    pred, ref = _squad_tokens(prediction), _squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def task_kind(
    train_outputs: Sequence[str], max_labels: int = 20
) -> tuple[TaskKindName, set[str] | None]:
    """Decide label vs free-text from a task's outputs; return the label set for label tasks.

    A label task has few distinct answers and each comes back often: at most ``max_labels``
    distinct outputs that make up at most half of the examples (so every label repeats, on
    average, at least twice). Short free-text answers seen once each stay "text".
    """
    outputs = [o.strip() for o in train_outputs]
    distinct = set(outputs)
    if outputs and len(distinct) <= max_labels and 2 * len(distinct) <= len(outputs):
        return "label", distinct
    return "text", None


def score_dict(score: TaskScore) -> dict[str, float | int]:
    """A TaskScore as the JSON object ``aftertune eval --json`` prints for one task."""
    out: dict[str, float | int] = {}
    if score.kind == "label":
        out["accuracy"] = score.accuracy if score.accuracy is not None else 0.0
    else:
        out["token_f1"] = score.token_f1 if score.token_f1 is not None else 0.0
        if score.exact_match is not None:
            out["exact_match"] = score.exact_match
    out["nll"] = score.nll
    out["n"] = score.n
    if score.valid is not None:
        out["valid"] = score.valid
    return out


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class EvalOptions:
    """``[eval]``: how a version is scored on held-out examples."""

    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(
        default=256,
        ge=1,
        description="cap on a free-text answer's tokens; its budget is the task's longest "
        "reference answer + 25 %, so a Chinese answer or a summary is not cut before scoring",
    )


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class EvalSpec(EvalOptions):
    """What scoring a version is told (by ``aftertune eval`` and the gate): ``[eval]``, and
    what other sections set: ``train.max_length``, ``gate.max_per_task`` and the template."""

    max_length: int = Field(ge=1)  # tokens of prompt + answer, as in training
    max_per_task: int = Field(ge=1)  # held-out examples per task and suite (the first by arrival)
    template: PromptTemplate


# --- the one scoring path of `aftertune eval` and the gate -------------------------------------------------------


def held_out(
    store: ExampleStore, cap: int, *, after: int = 0, until: int | None = None
) -> dict[str, list[Example]]:
    """Held-out records with ``after < seq <= until``, by task, the first ``cap`` of each."""
    out: dict[str, list[Example]] = {}
    for example in store.held_out(after=after, until=until):
        bucket = out.setdefault(example.task, [])
        if len(bucket) < cap:
            bucket.append(example)
    return out
