"""A whole learning cycle: data checks → train (or resume) → evaluate → gate → decide, per task.

Verdicts are per task. Before training, the data checks (``data_checks.py``) reject a task
whose new records relabel stored data or shift its answer shares (quarantined, no training
spent), and leave out a task too small to judge (waiting: its records stay live and keep
its watermark, ``window.py``). After training the gate judges every task; when some of the
tasks trained on are rejected, their records are quarantined and the cycle trains again
without them, once (``MAX_ATTEMPTS``): one bad producer never costs the other tasks their
feedback. A regression of an old task that no new task's verdict explains rejects the
window. Every attempt is a version in the registry with its verdicts.

Crash-safe by construction: every step leaves the registry in a state a re-run continues
from. A challenger already trained on the current champion is reused rather than trained
again; one left ``evaluating`` is evaluated again; promotion is one transaction that
moves the ``champion`` alias and retires the old champion together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aftertune.learners.candidate import train_candidate, window_until
from aftertune.learners.champion import load_version
from aftertune.learners.data_checks import DataPlan, plan_window
from aftertune.learners.errors import CycleBlocked, DataRejected, ExportError, NothingToTrain
from aftertune.learners.gate import Decision, GateReport, Verdict, judge
from aftertune.learners.judging import (
    SuiteScores,
    chance_levels,
    judged,
    mark_chance,
    metrics_of,
)
from aftertune.learners.learning_state import LearningState
from aftertune.learners.model_kind import AnswerSets
from aftertune.learners.promote import promote_and_publish, sync_latest
from aftertune.learners.shadow_gate import SHADOW, begin_shadow, shadow_wanted
from aftertune.learners.window import Suites, Watermarks, new_train, suites
from aftertune.store.bundles import Published
from aftertune.store.examples import DATA_CHECKS
from aftertune.store.failpoints import failpoint
from aftertune.store.registry import Registry, Version, VersionState

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a cycle trains again, once, without the tasks its first attempt rejected
Outcome = tuple[Decision, list[str], Published | None]  # what was decided, why, what published
StopAsk = Callable[[int, int], bool]


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
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts this cycle

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
            "verdicts": {t: v.value for t, v in sorted(self.report.verdicts.items())},
            "attempts": self.attempts,
            "bundle": None
            if bundle is None
            else {
                "version": bundle.version,
                "path": str(bundle.path),
                "manifest_sha256": bundle.manifest_sha256,
            },
        }


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
    if waiting and SHADOW in waiting[0].gate:
        v = waiting[0].version
        raise CycleBlocked(
            f"v{v} is in shadow evaluation on live traffic (`aftertune models show {v}`); "
            f"the next cycle runs once it is decided, or after `aftertune approve {v}` or "
            f"`aftertune reject {v} --why ...`"
        )
    if waiting:
        v = waiting[0].version
        raise CycleBlocked(
            f"v{v} awaits approval; run `aftertune approve {v}` "
            f"or `aftertune reject {v} --why ...` before the next cycle"
        )


def run_cycle(state: LearningState, *, should_stop: StopAsk | None = None) -> CycleResult:
    """Data checks → train → evaluate → gate → export + promote + publish, or reject, per
    task; a second attempt without the tasks the first rejected. Resumable.

    With ``specs.export`` set, a promotion also publishes the parity-checked bundle as
    latest; a failed export or parity check rejects the challenger instead.
    """
    sync_latest(state)  # what a crash before `latest` left
    _refuse_while_awaiting(state.registry)
    run = _CycleRun(state, state.registry.champion())
    attempts: list[dict[str, Any]] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        challenger, trained = run.train_or_resume(should_stop)
        result = run.decide(challenger, trained, last=attempt == MAX_ATTEMPTS)
        result.attempts = list(attempts)
        if not run.retry:
            return result
        attempts.append(
            {
                "version": result.version,
                "decision": result.decision.value,
                "reasons": result.reasons,
            }
        )
    raise AssertionError("unreachable: the last attempt never retries")


@dataclass
class _CycleRun:
    """The steps of one cycle, sharing what every step needs; ``timings`` in seconds."""

    state: LearningState
    champion: Version | None
    timings: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # tasks the model kind cannot score
    plan: DataPlan = field(default_factory=DataPlan)  # the data checks' verdicts
    retry: bool = False  # the last decision asks for another attempt without some tasks

    @property
    def marks(self) -> Watermarks:
        return Watermarks.of(self.champion)

    def train_or_resume(self, should_stop: StopAsk | None) -> tuple[Version, dict[str, Any] | None]:
        """The challenger an interrupted run left, or a new one after the data checks; then
        on to ``evaluating``."""
        state = self.state
        challenger = _pick_challenger(state.registry, self.champion, state.actor)
        trained = None
        if challenger is None:
            waiting = self.check_data()
            t0 = time.monotonic()
            report = train_candidate(state, should_stop=should_stop, waiting=waiting)
            self.timings["train_s"] = self.timings.get("train_s", 0.0) + time.monotonic() - t0
            trained = report.to_json()
            challenger = state.registry.get(report.candidate)
            failpoint("cycle.after_train")
        else:
            log.info("resuming the cycle of v%d (%s)", challenger.version, challenger.state.value)
        if challenger.state is VersionState.CANDIDATE:
            state.registry.transition(
                challenger.version,
                VersionState.EVALUATING,
                actor=state.actor,
                reason="gate evaluation",
            )
        return challenger, trained

    def check_data(self) -> list[str]:
        """Run the data checks on the window; quarantine the tasks they reject. Returns the
        waiting tasks. NothingToTrain when no task is left to learn."""
        state, marks = self.state, self.marks
        until = window_until(state, self.champion)
        new = new_train(state.store, marks, until)
        by_suite = suites(state.store, marks, until, state.specs.eval.max_per_task)
        sets = state.kind.answer_sets(
            state.store, sorted({e.task for e in new}), until, state.specs
        )
        # Tasks the kind cannot learn (free text for the ranking kind) are not judged here:
        # training leaves them out and says why.
        learnable = [e for e in new if e.task not in sets.refused]
        self.plan = plan_window(
            state.store, marks, until, learnable, by_suite, sets.sets, state.specs.rules
        )
        for task in self.plan.tasks(Verdict.REJECTED):
            why = self.plan.reasons[task]
            n = state.store.quarantine(
                marks.mark(task), until, DATA_CHECKS, tasks=[task], reason=why
            )
            log.warning("rejected before training, %d records quarantined: %s", n, why)
        for task in self.plan.tasks(Verdict.WAITING):
            log.info("waiting, left out of this cycle: %s", self.plan.reasons[task])
        if learnable and not self.plan.tasks(Verdict.ADMITTED):
            rejected = [self.plan.reasons[t] for t in self.plan.tasks(Verdict.REJECTED)]
            waiting = [self.plan.reasons[t] for t in self.plan.tasks(Verdict.WAITING)]
            if rejected:
                raise DataRejected(rejected + [f"waiting: {w}" for w in waiting])
            raise NothingToTrain("nothing to train yet: " + "; ".join(waiting))
        return self.plan.tasks(Verdict.WAITING)

    def decide(
        self, challenger: Version, trained: dict[str, Any] | None, *, last: bool
    ) -> CycleResult:
        """Score both, judge per task, then promote, wait for approval, retry or reject."""
        state = self.state
        by_suite, sets, chance = self.suites_of(challenger)
        # The champion as deployed: for the ranking kind, its own prototypes, not ones drawn
        # from the batch being judged.
        champion_dir = self.champion.adapter_dir if self.champion is not None else None
        champion_sets = state.kind.as_deployed(champion_dir, sets)
        champion_scores = self.score(self.champion, by_suite, champion_sets)
        failpoint("cycle.during_eval")
        challenger_scores = self.score(challenger, by_suite, sets)
        gate = self.judge(challenger, champion_scores, challenger_scores, chance["gain"])
        metrics = metrics_of(champion_scores, challenger_scores)
        mark_chance(metrics, chance["all"], state.specs.rules.chance_z)
        state.registry.set_metrics(challenger.version, metrics)
        self.retry = False
        if gate.decision is not Decision.REJECTED and shadow_wanted(state):
            decision, reasons, bundle = begin_shadow(state, challenger, gate)
        elif gate.decision is Decision.PROMOTED:
            decision, reasons, bundle = self.promote(challenger, gate)
        elif gate.decision is Decision.AWAITING_APPROVAL:
            decision, reasons, bundle = self.settle(
                challenger, VersionState.AWAITING_APPROVAL, gate
            )
        else:
            decision, reasons, bundle = self.reject(challenger, gate, last=last)
        reasons += [f"waiting: {self.plan.reasons[t]}" for t in self.plan.tasks(Verdict.WAITING)]
        reasons += [
            f"rejected before training: {self.plan.reasons[t]}"
            for t in self.plan.tasks(Verdict.REJECTED)
        ]
        reasons += [f"not scored: {why}" for why in self.refused.values()]
        log.info("v%d %s: %s", challenger.version, decision.value, "; ".join(reasons))
        return CycleResult(
            challenger.version,
            decision,
            reasons,
            metrics,
            gate,
            dict(self.timings),
            trained,
            bundle,
            self.refused,
        )

    def suites_of(self, challenger: Version) -> tuple[Suites, AnswerSets, dict[str, Any]]:
        """The held-out suites (each task split at its own watermark), the answer sets, and
        the chance levels: of the gain suite, and of all held-out records."""
        state = self.state
        by_suite = suites(
            state.store, self.marks, challenger.data_seq, state.specs.eval.max_per_task
        )
        trained = set(challenger.lineage.get("trained_on", {}).get("count_by_task", {}))
        tasks = sorted(trained.union(*by_suite.values()))
        answer_sets = state.kind.answer_sets(state.store, tasks, challenger.data_seq, state.specs)
        self.refused = answer_sets.refused
        for name in by_suite:
            by_suite[name] = {t: v for t, v in by_suite[name].items() if t not in self.refused}
        labels = answer_sets.sets
        everything = {
            t: [*by_suite["regression"].get(t, []), *by_suite["gain"].get(t, [])] for t in labels
        }
        chance = {
            "gain": chance_levels(by_suite["gain"], labels),
            "all": chance_levels(everything, labels),
        }
        return by_suite, labels, chance

    def score(self, version: Version | None, by_suite: Suites, sets: AnswerSets) -> SuiteScores:
        t0 = time.monotonic()
        state = self.state
        model, tokenizer = load_version(state.registry, state.specs.base, state.state_dir, version)
        scores = {
            name: state.kind.score(model, tokenizer, by_task, sets, state.specs)
            for name, by_task in by_suite.items()
        }
        self.timings["evaluate_s"] = self.timings.get("evaluate_s", 0.0) + time.monotonic() - t0
        return scores

    def judge(
        self,
        challenger: Version,
        champion_scores: SuiteScores,
        challenger_scores: SuiteScores,
        chance: dict[str, tuple[float, int]],
    ) -> GateReport:
        # A task "has a champion score" when the champion was judged on it before (it is in
        # the regression suite); a task new to the champion is held to value thresholds only.
        metrics = self.state.kind.judged_metrics
        known = set(champion_scores["regression"])
        regression = {
            t: (judged(champion_scores["regression"][t], metrics), judged(s, metrics))
            for t, s in challenger_scores["regression"].items()
        }
        gain = {
            t: (
                judged(champion_scores["gain"][t], metrics) if t in known else None,
                judged(s, metrics),
            )
            for t, s in challenger_scores["gain"].items()
        }
        new_tasks = set(challenger.lineage.get("trained_on", {}).get("count_by_task", {}))
        new_tasks -= set(self.refused)  # not learned or scored by this kind: said in reasons
        gate = judge(regression, gain, new_tasks, self.state.specs.rules, None, chance)
        for task in self.plan.tasks(Verdict.WAITING) + self.plan.tasks(Verdict.REJECTED):
            gate.verdicts.setdefault(task, self.plan.verdicts[task])
        return gate

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

    def reject(self, challenger: Version, gate: GateReport, *, last: bool) -> Outcome:
        """Quarantine what the gate rejected, then retry without it or reject the window.

        Set the batch aside before the decision is final, so a crash in between re-runs to
        the same end. Waiting for held-out data is not a verdict on the data itself.
        """
        trained = set(challenger.lineage.get("trained_on", {}).get("count_by_task", {}))
        rejected = [t for t in gate.rejected_tasks() if t in trained]
        admitted = sorted(trained - set(rejected) - set(self.refused))
        extra: list[str] = []
        if gate.unexplained or not rejected:
            doomed = [t for t in sorted(trained) if gate.verdicts.get(t) is not Verdict.WAITING]
            if gate.unexplained:
                extra = [
                    "the window is rejected: an earlier task regressed, which no new task's verdict explains"
                ]
        else:
            doomed = rejected
            if admitted and not last:
                self.retry = True
                extra = [
                    f"training again without {', '.join(rejected)} (their records are quarantined)"
                ]
        why = "; ".join(gate.reasons)
        for task in doomed:
            self.state.store.quarantine(
                self.marks.mark(task),
                challenger.data_seq,
                challenger.version,
                tasks=[task],
                reason=why,
            )
        decision, reasons, bundle = self.settle(challenger, VersionState.REJECTED, gate, extra)
        return decision, reasons + extra, bundle

    def settle(
        self,
        challenger: Version,
        state: VersionState,
        gate: GateReport,
        extra: list[str] | None = None,
    ) -> Outcome:
        why = "; ".join([*gate.reasons, *(extra or [])])
        report = {**gate.to_json(), "reasons": [*gate.reasons, *(extra or [])]}
        self.state.registry.transition(
            challenger.version, state, actor=self.state.actor, reason=why, gate=report
        )
        return gate.decision, list(gate.reasons), None
