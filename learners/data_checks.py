"""The data checks a cycle runs before any training: what each task's new records are worth.

Per task with new train records (after its watermark, ``window.py``):

- **relabels**: new records that give another answer to an input already stored, the same
  up to case, white space and punctuation (``gate.max_conflict_share``);
- **label shift**: a label task's new answers against its history: the total variation
  distance between the two answer shares (``gate.max_label_shift``; a batch of 30 or more
  records whose shares flipped, or that gives one answer of several);
- **waiting**: a task no held-out record of which arrived with its data, or a new label task
  whose held-out records no accuracy could beat chance on (too few, or all one answer), is
  left out of this cycle and stays live until it can be judged.

A task that fails a rule is rejected before a training run is spent on it: the cycle
quarantines its new records with the reason. Pure logic over the store, no torch.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from aftertune.learners.evaluate import normalize
from aftertune.learners.gate import GateRules, Verdict, chance_threshold
from aftertune.learners.model_kind import AnswerSets
from aftertune.learners.window import Suites, Watermarks
from aftertune.store.examples import Example, ExampleStore

MIN_SHIFT_BATCH = 30  # fewer new records say too little about a task's answer shares


@dataclass(frozen=True)
class DataPlan:
    """Each task's verdict before training, and why (for rejected and waiting tasks)."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def tasks(self, verdict: Verdict) -> list[str]:
        return sorted(t for t, v in self.verdicts.items() if v is verdict)


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def loose(text: str) -> str:
    """``text`` up to case, white space and punctuation (of any script)."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.casefold())).strip()


def plan_window(
    store: ExampleStore,
    marks: Watermarks,
    until: int,
    new: list[Example],
    suites: Suites,
    sets: AnswerSets,
    rules: GateRules,
) -> DataPlan:
    """The verdict of the data checks on each task of ``new`` (its new train records)."""
    plan = DataPlan()
    for task in sorted({ex.task for ex in new}):
        why = _rejection(store, marks.mark(task), until, task, rules, sets.get(task))
        verdict = Verdict.REJECTED if why else Verdict.ADMITTED
        if why is None:
            why = _waiting(task, suites, sets.get(task), rules)
            verdict = Verdict.WAITING if why else Verdict.ADMITTED
        plan.verdicts[task] = verdict
        if why:
            plan.reasons[task] = why
    return plan


def _rejection(
    store: ExampleStore, mark: int, until: int, task: str, rules: GateRules, labels: object
) -> str | None:
    # A thumbs-down says its answer is wrong: it relabels nothing and shifts no share.
    down = store.rated_down(task, until)
    records = [r for r in store.labelled(task, until) if r[0] not in down]
    old = [r for r in records if r[0] <= mark]
    fresh = [r for r in records if r[0] > mark]
    relabels = _relabels(old, fresh)
    share = relabels / len(fresh) if fresh else 0.0
    if share > rules.max_conflict_share + 1e-12:
        return (
            f"{task}: {relabels} of {len(fresh)} new records ({100 * share:.1f}%) give another "
            f"answer to an input already stored (the same up to case, spaces and punctuation), "
            f"more than the {100 * rules.max_conflict_share:g}% allowed (gate.max_conflict_share):"
            " the batch relabels stored data"
        )
    if labels is None or len(fresh) < MIN_SHIFT_BATCH or len(old) < MIN_SHIFT_BATCH:
        return None
    return _shift(
        task, Counter(r[3].strip() for r in old), Counter(r[3].strip() for r in fresh), rules
    )


def _relabels(old: list[tuple[int, str, str, str]], fresh: list[tuple[int, str, str, str]]) -> int:
    answers: dict[str, set[str]] = {}
    for _, instruction, input_, output in old:
        answers.setdefault(loose(instruction) + "\x1f" + loose(input_), set()).add(loose(output))
    return sum(
        1
        for _, instruction, input_, output in fresh
        if (known := answers.get(loose(instruction) + "\x1f" + loose(input_)))
        and loose(output) not in known
    )


def _shift(task: str, old: Counter[str], fresh: Counter[str], rules: GateRules) -> str | None:
    """Total variation distance between the history's and the batch's answer shares."""
    n_old, n_new = sum(old.values()), sum(fresh.values())
    answers = set(old) | set(fresh)
    distance = 0.5 * sum(abs(old[a] / n_old - fresh[a] / n_new) for a in answers)
    if distance <= rules.max_label_shift + 1e-12:
        return None
    top = ", ".join(f"{a!r} {100 * fresh[a] / n_new:.0f}%" for a, _ in fresh.most_common(3))
    was = ", ".join(f"{a!r} {100 * old[a] / n_old:.0f}%" for a, _ in fresh.most_common(3))
    return (
        f"{task}: the {n_new} new records' answers ({top}) differ from the task's {n_old} "
        f"stored ones ({was}) by {100 * distance:.0f}% of all answers, more than the "
        f"{100 * rules.max_label_shift:g}% allowed (gate.max_label_shift): the batch looks "
        "relabelled or one-sided"
    )


def _waiting(task: str, suites: Suites, labels: object, rules: GateRules) -> str | None:
    gain = suites["gain"].get(task, [])
    if not gain:
        return (
            f"{task}: no held-out record arrived with its new data, so what it learns cannot be "
            "measured; push more records, or some with split: test. Its records wait, live."
        )
    if labels is None or task in suites["regression"] or not rules.beat_chance:
        return None
    counts = Counter(normalize(ex.output) for ex in gain)
    majority = counts.most_common(1)[0][1] / len(gain)
    if chance_threshold(majority, len(gain), rules.chance_z) < 1:
        return None
    need = "held-out records with other answers" if majority >= 1 else "more held-out records"
    return (
        f"{task}: its {len(gain)} new held-out records cannot show it beats chance (always "
        f"giving the majority answer scores {100 * majority:.0f}%); {need} are needed. Its "
        "records wait, live."
    )
