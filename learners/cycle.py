"""A whole learning cycle: train (or resume) a challenger → evaluate → gate → decide.

Crash-safe by construction: every step leaves the registry in a state a re-run continues
from. A challenger already trained on the current champion is reused rather than trained
again; one left ``evaluating`` is evaluated again; promotion is one SQLite transaction that
moves the ``champion`` alias and retires the old champion together.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aftertune.learners.candidate import train_candidate
from aftertune.learners.champion import load_version
from aftertune.learners.errors import CycleBlocked, ExportError
from aftertune.learners.evaluate import TaskScore, held_out, normalize, score_dict
from aftertune.learners.gate import Decision, GateReport, chance_threshold, judge
from aftertune.learners.learning_state import LearningState
from aftertune.learners.model_kind import AnswerSets
from aftertune.learners.promote import promote_and_publish, sync_latest
from aftertune.learners.specs import LearningSpecs
from aftertune.store.bundles import Published
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.failpoints import failpoint
from aftertune.store.registry import Registry, Version, VersionState

log = logging.getLogger(__name__)

SUITES = ("regression", "gain")
Suites = dict[str, dict[str, list[Example]]]  # suite -> task -> held-out examples
SuiteScores = dict[str, dict[str, TaskScore]]  # suite -> task -> score
Outcome = tuple[Decision, list[str], Published | None]  # what was decided, why, what published
Chance = dict[str, tuple[float, int]]  # task -> (share of its majority answer, n), label tasks


@dataclass
class CycleResult:
    version: int
    decision: Decision
    reasons: list[str]
    metrics: dict[str, dict[str, Any]]
    report: GateReport
    timings: dict[str, float] = field(default_factory=dict)
    trained: dict[str, Any] | None = None  # the training report when this run trained
    bundle: Published | None = None  # the bundle published as latest with a promotion
    refused: dict[str, str] = field(default_factory=dict)  # tasks the model kind cannot score

    def to_json(self) -> dict[str, Any]:
        bundle = self.bundle
        return {
            "version": self.version,
            "decision": self.decision.value,
            "reasons": self.reasons,
            "metrics": self.metrics,
            "checks": [c.to_json() for c in self.report.checks],
            "timings": self.timings,
            "trained": self.trained,
            "refused": self.refused,
            "bundle": None
            if bundle is None
            else {
                "version": bundle.version,
                "path": str(bundle.path),
                "manifest_sha256": bundle.manifest_sha256,
            },
        }


def suites_for(store: ExampleStore, champion_seq: int, challenger_seq: int, cap: int) -> Suites:
    """Regression: held-out records the champion already had; gain: those that came since."""
    return {
        "regression": held_out(store, cap, after=0, until=champion_seq),
        "gain": held_out(store, cap, after=champion_seq, until=challenger_seq),
    }


def _union(scores: Sequence[TaskScore]) -> dict[str, float | int]:
    """One task's scores over both suites, weighted by examples."""
    parts = [score_dict(s) for s in scores]
    n = sum(int(p["n"]) for p in parts)
    out: dict[str, float | int] = {"n": n}
    for key in parts[0]:
        if key != "n":
            out[key] = sum(float(p[key]) * int(p["n"]) for p in parts) / n if n else 0.0
    return out


def _metrics(champion: SuiteScores, challenger: SuiteScores) -> dict[str, dict[str, Any]]:
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


def _mark_chance(metrics: dict[str, dict[str, Any]], chance: Chance, z: float) -> None:
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


def _floats(score: TaskScore) -> dict[str, float]:
    return {k: float(v) for k, v in score_dict(score).items()}


def _pick_challenger(registry: Registry, champion: Version | None, actor: str) -> Version | None:
    """A challenger left by an interrupted run, trained on the current champion, if any."""
    parent = champion.version if champion is not None else None
    found: Version | None = None
    for state in (VersionState.EVALUATING, VersionState.CANDIDATE):
        for version in registry.in_state(state):
            if version.parent == parent and found is None:
                found = version
            elif version.parent != parent:
                registry.transition(
                    version.version,
                    VersionState.REJECTED,
                    actor=actor,
                    reason=f"stale: trained on v{version.parent or 0}, no longer the champion",
                )
    return found


def _refuse_while_awaiting(registry: Registry) -> None:
    waiting = registry.in_state(VersionState.AWAITING_APPROVAL)
    if waiting:
        v = waiting[0].version
        raise CycleBlocked(
            f"v{v} awaits approval; run `aftertune approve {v}` "
            f"or `aftertune reject {v} --why ...` before the next cycle"
        )


def run_cycle(
    state: LearningState, *, should_stop: Callable[[int, int], bool] | None = None
) -> CycleResult:
    """Train → evaluate → gate → export + promote + publish, reject or wait. Resumable.

    With ``specs.export`` set, a promotion also publishes the parity-checked bundle as
    latest; a failed export or parity check rejects the challenger instead.
    """
    registry, specs = state.registry, state.specs
    run = _CycleRun(state)
    sync_latest(state)  # what a crash before `latest` left
    _refuse_while_awaiting(registry)
    champion = registry.champion()
    challenger, trained = run.train_or_resume(champion, should_stop)
    champion_scores, challenger_scores = run.score_both(champion, challenger)
    gate = run.judge(champion, challenger, champion_scores, challenger_scores)
    metrics = _metrics(champion_scores, challenger_scores)
    _mark_chance(metrics, run.chance["all"], specs.rules.chance_z)
    registry.set_metrics(challenger.version, metrics)
    if gate.decision is Decision.PROMOTED:
        decision, reasons, bundle = run.promote(challenger, gate)
    elif gate.decision is Decision.AWAITING_APPROVAL:
        decision, reasons, bundle = run.await_approval(challenger, gate)
    else:
        decision, reasons, bundle = run.reject(champion, challenger, gate)
    reasons += [f"not scored: {why}" for why in run.refused.values()]
    log.info("v%d %s: %s", challenger.version, decision.value, "; ".join(reasons))
    return CycleResult(
        challenger.version,
        decision,
        reasons,
        metrics,
        gate,
        run.timings,
        trained,
        bundle,
        run.refused,
    )


@dataclass
class _CycleRun:
    """The steps of one cycle, sharing what every step needs; ``timings`` in seconds."""

    state: LearningState
    timings: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # tasks the model kind cannot score
    chance: dict[str, Chance] = field(default_factory=dict)  # "gain" / "all" -> chance levels

    @property
    def store(self) -> ExampleStore:
        return self.state.store

    @property
    def registry(self) -> Registry:
        return self.state.registry

    @property
    def specs(self) -> LearningSpecs:
        return self.state.specs

    @property
    def actor(self) -> str:
        return self.state.actor

    def train_or_resume(
        self, champion: Version | None, should_stop: Callable[[int, int], bool] | None
    ) -> tuple[Version, dict[str, Any] | None]:
        """The challenger an interrupted run left, or a new one; then on to ``evaluating``."""
        challenger = _pick_challenger(self.registry, champion, self.actor)
        trained = None
        if challenger is None:
            t0 = time.monotonic()
            report = train_candidate(self.state, should_stop=should_stop)
            self.timings["train_s"] = time.monotonic() - t0
            trained = report.to_json()
            challenger = self.registry.get(report.candidate)
            failpoint("cycle.after_train")
        else:
            log.info("resuming the cycle of v%d (%s)", challenger.version, challenger.state.value)
        if challenger.state is VersionState.CANDIDATE:
            self.registry.transition(
                challenger.version,
                VersionState.EVALUATING,
                actor=self.actor,
                reason="gate evaluation",
            )
        return challenger, trained

    def score_both(
        self, champion: Version | None, challenger: Version
    ) -> tuple[SuiteScores, SuiteScores]:
        """Champion and challenger on the same suites, one model in memory at a time."""
        t0 = time.monotonic()
        champion_seq = champion.data_seq if champion is not None else 0
        suites = suites_for(
            self.store, champion_seq, challenger.data_seq, self.specs.eval.max_per_task
        )
        trained = set(challenger.lineage.get("trained_on", {}).get("count_by_task", {}))
        tasks = sorted(trained.union(*suites.values()))
        judged = self.state.kind.answer_sets(self.store, tasks, challenger.data_seq, self.specs)
        self.refused = judged.refused
        for name, by_task in suites.items():
            suites[name] = {t: v for t, v in by_task.items() if t not in judged.refused}
        labels = judged.sets
        everything = {
            t: [*suites["regression"].get(t, []), *suites["gain"].get(t, [])] for t in labels
        }
        self.chance = {
            "gain": chance_levels(suites["gain"], labels),
            "all": chance_levels(everything, labels),
        }
        champion_scores = self._score_suites(champion, suites, labels)
        failpoint("cycle.during_eval")
        challenger_scores = self._score_suites(challenger, suites, judged.sets)
        self.timings["evaluate_s"] = time.monotonic() - t0
        return champion_scores, challenger_scores

    def _score_suites(
        self, version: Version | None, suites: Suites, sets: AnswerSets
    ) -> SuiteScores:
        model, tokenizer = load_version(
            self.registry, self.specs.base, self.state.state_dir, version
        )
        return {
            name: self.state.kind.score(model, tokenizer, by_task, sets, self.specs)
            for name, by_task in suites.items()
        }

    def judge(
        self,
        champion: Version | None,
        challenger: Version,
        champion_scores: SuiteScores,
        challenger_scores: SuiteScores,
    ) -> GateReport:
        # A task "has a champion score" when the champion was judged on it before (it is in
        # the regression suite); a task new to the champion is held to value thresholds only.
        known = set(champion_scores["regression"])
        regression = {
            t: (_floats(champion_scores["regression"][t]), _floats(s))
            for t, s in challenger_scores["regression"].items()
        }
        gain = {
            t: (_floats(champion_scores["gain"][t]) if t in known else None, _floats(s))
            for t, s in challenger_scores["gain"].items()
        }
        new_tasks = set(challenger.lineage.get("trained_on", {}).get("count_by_task", {}))
        new_tasks -= set(self.refused)  # not learned or scored by this kind: said in reasons
        champion_seq = champion.data_seq if champion is not None else 0
        conflicts = self.store.conflicts(champion_seq, challenger.data_seq)
        return judge(
            regression, gain, new_tasks, self.specs.rules, conflicts, self.chance.get("gain")
        )

    def promote(self, challenger: Version, gate: GateReport) -> Outcome:
        """Export, parity, promote, publish; a failed export rejects instead."""
        t0 = time.monotonic()
        decision, reasons, bundle = gate.decision, list(gate.reasons), None
        try:
            bundle = promote_and_publish(
                self.state, challenger, reason="; ".join(gate.reasons), gate=gate.to_json()
            )
        except ExportError as exc:
            decision, reasons = Decision.REJECTED, [f"export: {exc}"]
        self.timings["publish_s"] = time.monotonic() - t0
        return decision, reasons, bundle

    def await_approval(self, challenger: Version, gate: GateReport) -> Outcome:
        return self._decided(challenger, VersionState.AWAITING_APPROVAL, gate)

    def reject(self, champion: Version | None, challenger: Version, gate: GateReport) -> Outcome:
        # Set the batch aside before the decision is final, so a crash in between re-runs
        # to the same end. Waiting for held-out data is not a verdict on the data itself.
        if not all(c.waits_for_data for c in gate.failures):
            champion_seq = champion.data_seq if champion is not None else 0
            self.store.quarantine(champion_seq, challenger.data_seq, challenger.version)
        return self._decided(challenger, VersionState.REJECTED, gate)

    def _decided(self, challenger: Version, state: VersionState, gate: GateReport) -> Outcome:
        why = "; ".join(gate.reasons)
        self.registry.transition(
            challenger.version, state, actor=self.actor, reason=why, gate=gate.to_json()
        )
        return gate.decision, list(gate.reasons), None
