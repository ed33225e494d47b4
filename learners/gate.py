"""The regression gate: may the challenger replace the champion? Decided per task, with reasons.

Rules in the style of TFX/TFMA model validation:

- value thresholds: an absolute floor per metric (a ceiling for NLL, where lower is better);
- change thresholds against the champion: the largest allowed drop, absolute and relative;
- a minimum gain on the tasks that got new data;
- a label task the champion has no score for yet must beat chance: its accuracy on the new
  held-out records must exceed the share of the majority answer there by ``chance_z``
  standard errors of that share (a one-sided binomial test: with the default 1.645, a model
  that only ever gives the majority answer passes about one time in twenty).

Two suites stay apart. *Regression* uses the held-out records that already existed when
the champion was made; *gain* uses the held-out records that arrived with this cycle's
data, so a poisoned batch cannot vouch for itself. Pure logic, no torch: the same inputs
always give the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from aftertune.learners.shadow_rules import ShadowOptions
from aftertune.learners.spec_config import SPEC_CONFIG

# Metrics the gate knows, and which way is better.
HIGHER_IS_BETTER = {"accuracy": True, "token_f1": True, "valid": True, "nll": False}
PRIMARY = ("accuracy", "token_f1")  # a task's headline score: whichever it has

Scores = Mapping[str, float]  # metric -> value for one task on one suite


class Decision(str, Enum):
    PROMOTED = "promoted"
    REJECTED = "rejected"
    AWAITING_APPROVAL = "awaiting_approval"


# A relative change is taken of at least this much: an NLL of 0.0002 nats that becomes
# 0.0006 (the reference's probability 0.9998 -> 0.9994) rose by 163 % of itself, but by
# 2 % of 0.02 nats (probability 0.98), which is what it is worth. Measured: a clean dbpedia
# batch on MiniLM was rejected for exactly that agnews rise (bench/gate.py, 120 steps).
RELATIVE_BASE = {"nll": 0.02}


class Suite(str, Enum):
    REGRESSION = "regression"
    GAIN = "gain"


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class MetricRules:
    """Thresholds per metric name; a metric absent from a mapping is not checked by it.

    Drops, relative drops and floors are all >= 0 (an NLL's too); a proportion's are at most 1.
    ``[gate.tasks.NAME]``: one task's overrides of ``[gate]``'s.
    """

    floor: Mapping[str, float] = Field(default_factory=dict, description="ceiling for nll")
    max_drop: Mapping[str, float] = Field(default_factory=dict, description="absolute, vs champion")
    max_drop_rel: Mapping[str, float] = Field(
        default_factory=dict, description="fraction of the champion's value"
    )

    @field_validator("floor", "max_drop", "max_drop_rel")
    @classmethod
    def _metrics(cls, table: Mapping[str, float]) -> Mapping[str, float]:
        for metric, bound in table.items():
            if metric not in HIGHER_IS_BETTER:
                raise ValueError(f"unknown metric {metric!r}; known: {', '.join(HIGHER_IS_BETTER)}")
            if metric in PROPORTIONS and not 0 <= bound <= 1:
                raise ValueError(f"{metric} must be between 0 and 1 (a proportion)")
            if bound < 0:
                raise ValueError(f"{metric} must be at least 0")
        return table

    def merged(self, override: MetricRules) -> MetricRules:
        return MetricRules(
            floor={**self.floor, **override.floor},
            max_drop={**self.max_drop, **override.max_drop},
            max_drop_rel={**self.max_drop_rel, **override.max_drop_rel},
        )


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class GateOptions(ShadowOptions):
    """The gate's rules besides the per-metric thresholds (``[gate]``); the rule on live
    traffic is ``shadow_rules.py``'s."""

    min_gain: float = Field(
        default=0.0, ge=-1, le=1, description="headline score gain on new held-out data"
    )
    min_nll_gain: float = Field(
        default=0.01, description="NLL improvement (nats per token) on new held-out data"
    )
    noise_z: float = Field(
        default=1.0, ge=0, description="max_drop of accuracy is at least this many std errors"
    )
    max_nll_rise_same_task: float = Field(
        default=0.02, ge=0, description="new data of a task may raise nll on its old held-out by"
    )
    max_conflict_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="new records giving another answer to a stored input (up to case, spaces"
        " and punctuation)",
    )
    max_label_shift: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="a batch's answer shares against its task's history (total variation"
        " distance, batches and histories of 30+ records)",
    )
    beat_chance: bool = Field(
        default=True,
        description="a label task new to the champion must beat always giving its majority answer",
    )
    chance_z: float = Field(
        default=1.645,
        ge=0,
        le=10,
        description="...by this many standard errors of the majority share (1.645: 5 % one-sided)",
    )
    require_approval: bool = False


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class GateRules(GateOptions):
    """What the gate is told: ``[gate]``'s rules, its thresholds for every task (``default``)
    and each task's own (``per_task``, over the default)."""

    default: MetricRules
    per_task: Mapping[str, MetricRules]

    def for_task(self, task: str) -> MetricRules:
        override = self.per_task.get(task)
        return self.default if override is None else self.default.merged(override)


@dataclass(frozen=True)
class Check:
    """One rule applied to one task and metric. A rule that cannot be judged (the metric
    or the held-out set is missing) fails: ``passed`` is False with a message saying why."""

    task: str
    suite: Suite
    metric: str
    rule: str
    champion: float | None
    challenger: float | None
    threshold: float | None
    passed: bool
    message: str
    clause: str = ""  # the limit in words ("the 0.005 nats allowed (...)"), for joined reasons

    @property
    def waits_for_data(self) -> bool:
        """Failed for want of held-out data, which no model could pass: none at all, or a
        chance level no accuracy can beat (too few records, or all with one answer). Not
        a verdict on the batch: it stays live and is judged again when more data arrives."""
        if self.rule == "held_out_present":
            return True
        return self.rule == "chance" and self.threshold is not None and self.threshold >= 1

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["suite"] = self.suite.value
        return out


class Verdict(str, Enum):
    """What the gate says of one task's new records."""

    ADMITTED = "admitted"  # learned and judged: promoted with the challenger
    REJECTED = "rejected"  # a rule failed: quarantined, never trained or judged again
    WAITING = "waiting"  # too little held-out data to judge: stays live, out of this cycle


@dataclass(frozen=True)
class GateReport:
    decision: Decision
    checks: list[Check]
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # task with new data -> verdict

    @property
    def unexplained(self) -> list[Check]:
        """Failures of tasks without new data: a regression no new task's verdict explains."""
        return [c for c in self.failures if c.task not in self.verdicts]

    def rejected_tasks(self) -> list[str]:
        return sorted(t for t, v in self.verdicts.items() if v is Verdict.REJECTED)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def reasons(self) -> list[str]:
        """Why: what the data looks like, then every failed check; or (when it passed) that
        every check held."""
        if self.failures:
            return [*mislabelled(self.checks, self.verdicts), *_joined(self.failures)]
        if not self.checks:
            return [
                "no rule applied: every task is new to the champion and no value "
                "thresholds (gate.floor) are set"
            ]
        return [f"all {len(self.checks)} checks passed"]

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision.value,
            "reasons": self.reasons,
            "checks": [c.to_json() for c in self.checks],
            "verdicts": {t: v.value for t, v in sorted(self.verdicts.items())},
        }


def mislabelled(checks: list[Check], verdicts: Mapping[str, Verdict]) -> list[str]:
    """The data problem a flipped batch is: learning a task's new records made its earlier
    held-out records worse while its new ones (the batch's own) got better."""
    out = []
    for task in sorted(t for t, v in verdicts.items() if v is Verdict.REJECTED):
        worse = [
            c
            for c in checks
            if c.task == task
            and c.suite is Suite.REGRESSION
            and not c.passed
            and c.champion is not None
            and c.challenger is not None
        ]
        better = [
            c
            for c in checks
            if c.task == task
            and c.suite is Suite.GAIN
            and c.rule in ("min_gain", "min_nll_gain")
            and c.champion is not None
            and c.challenger is not None
            and _drop(c.metric, c.champion, c.challenger) < 0
        ]
        if worse and better:
            w, b = worse[0], better[0]
            out.append(
                f"{task}: its new records look mislabelled: learning them made its earlier "
                f"held-out records worse ({_changed(w.metric, w.champion or 0.0, w.challenger or 0.0)})"
                f" while its new held-out records, the batch's own, got better "
                f"({_changed(b.metric, b.champion or 0.0, b.challenger or 0.0)})"
            )
    return out


def verdicts_of(checks: list[Check], new_data_tasks: set[str]) -> dict[str, Verdict]:
    """Per task with new data: rejected when one of its checks failed as a verdict on the
    data, waiting when its only failures are for want of held-out data, else admitted."""
    out: dict[str, Verdict] = {}
    for task in sorted(new_data_tasks):
        failed = [c for c in checks if c.task == task and not c.passed]
        if not failed:
            out[task] = Verdict.ADMITTED
        elif all(c.waits_for_data for c in failed):
            out[task] = Verdict.WAITING
        else:
            out[task] = Verdict.REJECTED
    return out


def _joined(failures: list[Check]) -> list[str]:
    """One line per failed metric: a metric over both its absolute and its relative limit
    is one reason, with both limits."""
    lines: list[str] = []
    drop_line: dict[tuple[str, Suite, str], int] = {}  # where each metric's max_drop line is
    for check in failures:
        key = (check.task, check.suite, check.metric)
        if check.rule == "max_drop_rel" and key in drop_line:
            lines[drop_line[key]] += f"; also more than {check.clause}"
            continue
        if check.rule == "max_drop":
            drop_line[key] = len(lines)
        lines.append(check.message)
    return lines


# What a person reads for each metric, and its unit: shares in percent, changes of a share in
# percentage points, the log-loss (mean NLL of the reference answer) in nats.
LABELS = {
    "accuracy": "accuracy",
    "token_f1": "token F1",
    "valid": "valid answers",
    "nll": "log-loss",
}


def show(metric: str, value: float | None) -> str:
    """A metric's value as the gate, the report and ``models show`` print it: '81.0%'."""
    if value is None:
        return "n/a"
    if metric in PROPORTIONS:
        return f"{100 * value:.1f}%"
    if metric == "nll":
        return f"{value:.4g} nats"
    return f"{value:.4g}"


def _amount(metric: str, change: float) -> str:
    """A change of a metric in its unit: '30.0 points', '0.018 nats'."""
    if metric in PROPORTIONS:
        return f"{100 * change:.1f} points"
    if metric == "nll":
        return f"{change:.4g} nats"
    return f"{change:.4g}"


EARLIER = " on earlier held-out records"  # the regression suite, in words
NEW = " on new held-out records"  # the gain suite


def _value_checks(task: str, suite: Suite, challenger: Scores, rules: MetricRules) -> list[Check]:
    out = []
    for metric, bound in sorted(rules.floor.items()):
        if metric not in challenger:
            continue  # a floor for accuracy says nothing about a free-text task
        value = challenger[metric]
        higher = HIGHER_IS_BETTER[metric]
        ok = value >= bound if higher else value <= bound
        word = "floor" if higher else "ceiling"
        out.append(
            Check(
                task,
                suite,
                metric,
                f"value_{word}",
                None,
                value,
                bound,
                ok,
                f"{task}: {LABELS.get(metric, metric)}"
                f"{EARLIER if suite is Suite.REGRESSION else NEW} {show(metric, value)} "
                f"{'meets' if ok else 'is under' if higher else 'is over'} the {word} of "
                f"{show(metric, bound)} (gate.floor)",
            )
        )
    return out


PROPORTIONS = ("accuracy", "token_f1", "valid")  # metrics in [0, 1] averaged over examples


def _noise(metric: str, value: float, n: float, z: float) -> float:
    """z binomial standard errors of a proportion measured on n examples (0: not one)."""
    if metric not in PROPORTIONS or n <= 0 or z <= 0:
        return 0.0
    return z * math.sqrt(max(value * (1 - value), 0.25 / n) / n)


def _change_checks(
    task: str, champion: Scores, challenger: Scores, rules: MetricRules, noise_z: float = 0.0
) -> list[Check]:
    """Drops against the champion on the regression suite, absolute and relative."""
    out: list[Check] = []
    for metric in sorted(set(rules.max_drop) | set(rules.max_drop_rel)):
        if metric not in champion:
            continue
        if metric not in challenger:
            out.append(_missing_metric(task, metric, champion[metric]))
            continue
        if metric in rules.max_drop:
            out.append(_drop_check(task, metric, champion, challenger[metric], rules, noise_z))
        if metric in rules.max_drop_rel and champion[metric] != 0:
            out.append(
                _relative_drop_check(task, metric, champion[metric], challenger[metric], rules)
            )
    return out


def _drop(metric: str, old: float, new: float) -> float:
    """How much worse ``new`` is than ``old`` (negative: better)."""
    return (old - new) if HIGHER_IS_BETTER[metric] else (new - old)


def _moved(metric: str, old: float, new: float, ok: bool, clause: str, where: str = "") -> str:
    """'accuracy on earlier held-out records 81.0% -> 51.0%: fell by 30.0 points, more than
    the 5.0 points allowed (gate.max_drop)'; an improvement or no change says so instead."""
    head = f"{LABELS.get(metric, metric)}{where} {show(metric, old)} -> {show(metric, new)}"
    if new == old:
        return f"{head}: unchanged"
    moved = f"{head}: {'rose' if new > old else 'fell'} by {_amount(metric, abs(new - old))}"
    if (new > old) == HIGHER_IS_BETTER[metric]:
        return f"{moved} (an improvement)"
    return f"{moved}, {'within' if ok else 'more than'} {clause}"


def _changed(metric: str, old: float, new: float, where: str = "") -> str:
    """'accuracy on new held-out records 40.0% -> 45.0%: rose by 5.0 points', '... unchanged'."""
    head = f"{LABELS.get(metric, metric)}{where} {show(metric, old)} -> {show(metric, new)}"
    if new == old:
        return f"{head}: unchanged"
    return f"{head}: {'rose' if new > old else 'fell'} by {_amount(metric, abs(new - old))}"


def _missing_metric(task: str, metric: str, old: float) -> Check:
    message = f"{task}: the challenger has no {LABELS.get(metric, metric)} (the champion's: {show(metric, old)})"
    return Check(task, Suite.REGRESSION, metric, "metric_present", old, None, None, False, message)


def _drop_check(
    task: str, metric: str, champion: Scores, new: float, rules: MetricRules, noise_z: float
) -> Check:
    old, allowed = champion[metric], rules.max_drop[metric]
    drop = _drop(metric, old, new)
    # On a small held-out set one answer moves accuracy by 1/n: never demand more
    # precision than the sample has (noise_z standard errors).
    n = champion.get("n", 0)
    noise = _noise(metric, old, n, noise_z)
    limit = max(allowed, noise)
    clause = f"the {_amount(metric, limit)} allowed (gate.max_drop"
    if noise > allowed:
        clause += (
            f" {_amount(metric, allowed)}, widened for the noise of {n:g} records, gate.noise_z"
        )
    clause += ")"
    ok = drop <= limit + 1e-12
    message = f"{task}: {_moved(metric, old, new, ok, clause, EARLIER)}"
    return Check(task, Suite.REGRESSION, metric, "max_drop", old, new, limit, ok, message, clause)


def _relative_drop_check(
    task: str, metric: str, old: float, new: float, rules: MetricRules
) -> Check:
    limit = rules.max_drop_rel[metric]
    base = max(abs(old), RELATIVE_BASE.get(metric, 0.0))
    rel = _drop(metric, old, new) / base
    ok = rel <= limit + 1e-12
    of = (
        f"the champion's {show(metric, old)}"
        if base == abs(old)
        else f"{show(metric, base)}, the least it is taken of"
    )
    clause = (
        f"the {_amount(metric, limit * base)} allowed ({100 * limit:g}% of {of}, gate.max_drop_rel)"
    )
    message = f"{task}: {_moved(metric, old, new, ok, clause, EARLIER)}"
    return Check(
        task, Suite.REGRESSION, metric, "max_drop_rel", old, new, limit, ok, message, clause
    )


def _gain_checks(
    task: str, champion: Scores | None, challenger: Scores, rules: GateRules
) -> list[Check]:
    if champion is None:
        return []  # no champion score yet: value thresholds only
    out = []
    suite = Suite.GAIN
    primary = next((m for m in PRIMARY if m in challenger and m in champion), None)
    if primary is not None:
        gain = challenger[primary] - champion[primary]
        ok = gain >= rules.min_gain - 1e-12
        out.append(
            Check(
                task,
                suite,
                primary,
                "min_gain",
                champion[primary],
                challenger[primary],
                rules.min_gain,
                ok,
                f"{task}: {_changed(primary, champion[primary], challenger[primary], NEW)} "
                f"(it must rise by at least {_amount(primary, rules.min_gain)}, gate.min_gain)",
            )
        )
    if "nll" in challenger and "nll" in champion:
        gain = champion["nll"] - challenger["nll"]
        ok = gain >= rules.min_nll_gain - 1e-12
        out.append(
            Check(
                task,
                suite,
                "nll",
                "min_nll_gain",
                champion["nll"],
                challenger["nll"],
                rules.min_nll_gain,
                ok,
                f"{task}: {_changed('nll', champion['nll'], challenger['nll'], NEW)} "
                f"(it must fall by at least {_amount('nll', rules.min_nll_gain)}, "
                "gate.min_nll_gain)",
            )
        )
    return out


def chance_threshold(majority: float, n: int, z: float) -> float:
    """Accuracy a model must exceed on ``n`` examples to beat always giving the majority
    answer (which scores ``majority``): that share plus ``z`` of its standard errors."""
    return majority + _noise("accuracy", majority, n, z)


def _chance_check(task: str, challenger: Scores, majority: float, n: int, z: float) -> list[Check]:
    if "accuracy" not in challenger or n <= 0:
        return []  # free text has no majority class
    value, threshold = challenger["accuracy"], chance_threshold(majority, n, z)
    ok = value > threshold + 1e-12
    scored = f"{task}: accuracy {100 * value:.1f}% on {n} new held-out records"
    if threshold < 1:
        message = (
            f"{scored} {'beats chance' if ok else 'is at chance level'}: always giving the "
            f"majority answer scores {100 * majority:.1f}%, and beating that needs over "
            f"{100 * threshold:.1f}% ({z:g} standard errors more, for n={n}; gate.chance_z)"
        )
    elif majority >= 1:  # no accuracy can pass: say what would, not "needs over 112%"
        message = (
            f"{scored} cannot beat chance: they all have the same answer, so a model that "
            "always gives it scores as well; held-out records with other answers are needed"
        )
    else:
        message = (
            f"{scored} cannot beat chance: always giving the majority answer scores "
            f"{100 * majority:.1f}%, and beating that by {z:g} standard errors (gate.chance_z) "
            f"needs more held-out records than {n}"
        )
    return [Check(task, Suite.GAIN, "accuracy", "chance", None, value, threshold, ok, message)]


def _consistency_check(
    task: str, champion: Scores | None, challenger: Scores | None, rules: GateRules
) -> list[Check]:
    """New data for a task must not make the task's own old held-out set worse.

    Clean data of a task improves (or keeps) the reference NLL on that task's earlier
    held-out records; mislabelled data raises it, even when the model is too small to
    move accuracy and even when it "improves" on the batch's own poisoned held-out part.
    Where the kind is not judged on NLL (ranking), its accuracy there must not fall by more
    than the noise of the sample (or the task's ``max_drop``, when wider).
    """
    if champion is None or challenger is None:
        return []
    if "nll" in champion and "nll" in challenger:
        metric, limit = "nll", rules.max_nll_rise_same_task
    elif "accuracy" in champion and "accuracy" in challenger:
        metric = "accuracy"
        noise = _noise(metric, champion[metric], champion.get("n", 0), max(rules.noise_z, 1.0))
        limit = max(rules.for_task(task).max_drop.get(metric, 0.0), noise)
    else:
        return []
    old, new = champion[metric], challenger[metric]
    ok = _drop(metric, old, new) <= limit + 1e-12
    message = _consistency_message(task, metric, old, new, ok, limit)
    return [
        Check(task, Suite.REGRESSION, metric, "same_task_consistency", old, new, limit, ok, message)
    ]


def _consistency_message(
    task: str, metric: str, old: float, new: float, ok: bool, limit: float
) -> str:
    worse = "rise" if metric == "nll" else "drop"
    verdict = (
        f"within the {_amount(metric, limit)} {worse} allowed"
        if ok
        else f"more than the {_amount(metric, limit)} {worse} allowed: its new records look"
        " mislabelled"
    )
    return (
        f"{task}: with this task's new data, {_changed(metric, old, new, EARLIER)}, {verdict}"
        " (gate.max_nll_rise_same_task)"
        if metric == "nll"
        else f"{task}: with this task's new data, {_changed(metric, old, new, EARLIER)}, "
        f"{verdict} (the noise of the held-out sample, gate.noise_z)"
    )


def _conflict_check(task: str, new: int, conflicting: int, rules: GateRules) -> Check:
    share = conflicting / new if new else 0.0
    ok = share <= rules.max_conflict_share + 1e-12
    return Check(
        task,
        Suite.GAIN,
        "conflicts",
        "max_conflict_share",
        None,
        share,
        rules.max_conflict_share,
        ok,
        f"{task}: {conflicting} of {new} new records ({100 * share:.1f}%) give another answer "
        f"to an input already stored, {'within' if ok else 'more than'} the "
        f"{100 * rules.max_conflict_share:g}% allowed (gate.max_conflict_share)"
        + ("" if ok else ": the batch relabels stored data"),
    )


def judge(
    regression: Mapping[str, tuple[Scores | None, Scores | None]],
    gain: Mapping[str, tuple[Scores | None, Scores | None]],
    new_data_tasks: set[str],
    rules: GateRules,
    conflicts: Mapping[str, tuple[int, int]] | None = None,
    chance: Mapping[str, tuple[float, int]] | None = None,
) -> GateReport:
    """Decide. Each suite maps task -> (champion scores, challenger scores); a side is None
    when that model was not scored on it (no held-out examples in that suite). ``chance``:
    task -> (share of the majority answer, n) on the gain suite, for label tasks.
    """
    checks: list[Check] = []
    for task in sorted(regression):
        champion, challenger = regression[task]
        if challenger is None:
            continue  # no old held-out examples for this task: nothing to regress on
        task_rules = rules.for_task(task)
        checks += _value_checks(task, Suite.REGRESSION, challenger, task_rules)
        if champion is not None:
            checks += _change_checks(task, champion, challenger, task_rules, rules.noise_z)
    for task, (new, conflicting) in sorted((conflicts or {}).items()):
        if conflicting:
            checks.append(_conflict_check(task, new, conflicting, rules))
    for task in sorted(new_data_tasks & set(regression)):
        checks += _consistency_check(task, *regression[task], rules)
    for task in sorted(new_data_tasks):
        champion, challenger = gain.get(task, (None, None))
        if challenger is None:
            checks.append(
                Check(
                    task,
                    Suite.GAIN,
                    "n",
                    "held_out_present",
                    None,
                    None,
                    None,
                    False,
                    f"{task}: no held-out examples arrived with the new data, so the gain "
                    "cannot be measured; push more records or some with split: test",
                )
            )
            continue
        checks += _value_checks(task, Suite.GAIN, challenger, rules.for_task(task))
        checks += _gain_checks(task, champion, challenger, rules)
        if champion is None and rules.beat_chance and task in (chance or {}):
            checks += _chance_check(task, challenger, *(chance or {})[task], rules.chance_z)
    if any(not c.passed for c in checks):
        decision = Decision.REJECTED
    elif rules.require_approval:
        decision = Decision.AWAITING_APPROVAL
    else:
        decision = Decision.PROMOTED
    return GateReport(decision, checks, verdicts_of(checks, new_data_tasks))
