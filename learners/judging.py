"""Scoring for the gate: the metrics the registry keeps, and what chance would score.

``metrics_of`` folds champion and challenger scores on both suites into the per-task JSON a
version keeps (``models show``, the report); ``chance_levels`` says per label task how
often always giving the majority answer is right, which a task new to the champion must
beat; ``judged`` keeps of a score only the metrics the model kind is judged on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

from aftertune.learners.evaluate import TaskScore, normalize, score_dict
from aftertune.learners.gate import chance_threshold
from aftertune.learners.model_kind import AnswerSets
from aftertune.store.examples import Example

SUITES = ("regression", "gain")
SuiteScores = dict[str, dict[str, TaskScore]]  # suite -> task -> score
Chance = dict[str, tuple[float, int]]  # task -> (share of its majority answer, n), label tasks


def _union(scores: Sequence[TaskScore]) -> dict[str, float | int]:
    """One task's scores over both suites, weighted by examples."""
    parts = [score_dict(s) for s in scores]
    n = sum(int(p["n"]) for p in parts)
    out: dict[str, float | int] = {"n": n}
    for key in parts[0]:
        if key != "n":
            out[key] = sum(float(p[key]) * int(p["n"]) for p in parts) / n if n else 0.0
    return out


def metrics_of(champion: SuiteScores, challenger: SuiteScores) -> dict[str, dict[str, Any]]:
    tasks = sorted({t for suite in challenger.values() for t in suite})
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        entry: dict[str, Any] = {"suites": {}}
        for who, scores in (("champion", champion), ("challenger", challenger)):
            parts = [scores[s][task] for s in SUITES if task in scores[s]]
            entry[who] = _union(parts)
            for suite in SUITES:
                if task in scores[suite]:
                    entry["suites"].setdefault(suite, {})[who] = score_dict(scores[suite][task])
        out[task] = entry
    return out


def chance_levels(by_task: dict[str, list[Example]], labels: AnswerSets) -> Chance:
    """Per label task, how often always giving the most frequent answer would be right."""
    out: Chance = {}
    for task, examples in by_task.items():
        if labels.get(task) and examples:
            counts = Counter(normalize(e.output) for e in examples)
            out[task] = (counts.most_common(1)[0][1] / len(examples), len(examples))
    return out


def mark_chance(metrics: dict[str, dict[str, Any]], chance: Chance, z: float) -> None:
    """Add to each label task's metrics its chance level on all its held-out records."""
    for task, (majority, n) in chance.items():
        if task in metrics and "accuracy" in metrics[task]["challenger"]:
            threshold = chance_threshold(majority, n, z)
            metrics[task]["chance"] = {
                "majority": majority,
                "n": n,
                "threshold": threshold,
                "at_chance": metrics[task]["challenger"]["accuracy"] <= threshold + 1e-12,
            }


def judged(score: TaskScore, metrics: Collection[str]) -> dict[str, float]:
    """The figures of ``score`` the gate judges: the kind's metrics, and ``n``."""
    return {k: float(v) for k, v in score_dict(score).items() if k in metrics or k == "n"}
