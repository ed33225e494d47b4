"""Scoring a ranking model: accuracy of the nearest candidate, and its cross-entropy.

Per task, every held-out prompt is ranked against the anchors of the task's candidates (their
prototypes, from the exemplars the answer sets carry, embedded by the model scored:
``encoder.rank``); accuracy is the share whose nearest candidate is the reference, ``nll`` the mean
cross-entropy (nats per example) of the reference under softmax(cosine / temperature), the
same loss the kind trains on. ``valid`` is 1: a ranked answer is always one of the labels.
A reference that is not among the candidates (a label no train record carries) counts as a
miss and adds the NLL of the least likely candidate.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from aftertune.learners.evaluate import EvalSpec, TaskScore
from aftertune.learners.kinds.ranking.candidates import AnswerSet
from aftertune.learners.kinds.ranking.encoder import rank, ranking_nll
from aftertune.learners.specs import RankingSpec
from aftertune.store.examples import Example
from aftertune.store.progress import Progress


def rank_scores(
    model: Any,
    tokenizer: Any,
    by_task: Mapping[str, Sequence[Example]],
    sets: Mapping[str, Collection[str] | None],
    spec: EvalSpec,
    ranking: RankingSpec,
) -> dict[str, TaskScore]:
    """Scores of ``model`` on every task of ``by_task`` that has candidates."""
    scores: dict[str, TaskScore] = {}
    device = next(model.parameters()).device
    tasks = sorted(by_task)
    for task in Progress(f"evaluate {len(tasks)} tasks", len(tasks), "task").track(tasks):
        found = sets.get(task)
        examples = list(by_task[task])
        if not found or not examples:
            continue
        candidates = found if isinstance(found, AnswerSet) else AnswerSet(sorted(found))
        prompts = [spec.template.render(ex.instruction, ex.input) for ex in examples]
        sims = rank(
            model,
            tokenizer,
            prompts,
            candidates,
            max_length=spec.max_length,
            batch_size=spec.batch_size,
            device=device,
        )
        index = {c: i for i, c in enumerate(candidates)}
        targets = [index.get(ex.output.strip(), -1) for ex in examples]
        picks = sims.argmax(1).tolist()
        hits = sum(p == t for p, t in zip(picks, targets, strict=True))
        known = [i for i, t in enumerate(targets) if t >= 0]
        nll = ranking_nll(sims[known], [targets[i] for i in known], ranking.temperature)
        if len(known) < len(targets):
            worst = -(sims / ranking.temperature).log_softmax(1).min(1).values
            nll += float(sum(worst[i] for i in range(len(targets)) if targets[i] < 0))
        n = len(examples)
        scores[task] = TaskScore(task, "label", n, hits / n, None, nll / n, 1.0)
    return scores
