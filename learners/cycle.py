"""A whole learning cycle: train (or resume) a challenger → evaluate → gate → decide.

Crash-safe by construction: every step leaves the registry in a state a re-run continues
from. A challenger already trained on the current champion is reused rather than trained
again; one left ``evaluating`` is evaluated again; promotion is one SQLite transaction that
moves the ``champion`` alias and retires the old champion together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aftertune.learners.candidate import champion_model, label_sets, train_candidate
from aftertune.learners.errors import CycleBlocked, ExportError
from aftertune.learners.evaluate import TaskScore, evaluate, score_dict
from aftertune.learners.ewc import EwcSpec
from aftertune.learners.export import ExportSpec
from aftertune.learners.gate import Decision, GateReport, GateRules, judge
from aftertune.learners.lora import LoraSpec
from aftertune.learners.promote import promote_and_publish, sync_latest
from aftertune.learners.recipe import TrainSpec
from aftertune.learners.replay import ReplaySpec
from aftertune.store.bundles import Published
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.failpoints import failpoint
from aftertune.store.registry import Registry, Version, VersionState

log = logging.getLogger(__name__)

Suites = dict[str, dict[str, list[Example]]]  # suite -> task -> held-out examples


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int = 32
    max_new_tokens: int = 16
    max_length: int = 256
    max_per_task: int = 200  # held-out examples per task and suite (the first by arrival)


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

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "decision": self.decision.value,
            "reasons": self.reasons,
            "metrics": self.metrics,
            "checks": [c.to_json() for c in self.report.checks],
            "timings": self.timings,
            "trained": self.trained,
            "bundle": None
            if self.bundle is None
            else {
                "version": self.bundle.version,
                "path": str(self.bundle.path),
                "manifest_sha256": self.bundle.manifest_sha256,
            },
        }


def suites_for(store: ExampleStore, champion_seq: int, challenger_seq: int, cap: int) -> Suites:
    """Regression: held-out records the champion already had; gain: those that came since."""
    out: Suites = {"regression": {}, "gain": {}}
    for name, after, until in (
        ("regression", 0, champion_seq),
        ("gain", champion_seq, challenger_seq),
    ):
        for ex in store.held_out(after=after, until=until):
            bucket = out[name].setdefault(ex.task, [])
            if len(bucket) < cap:
                bucket.append(ex)
    return out


def _score(
    model: Any,
    tokenizer: Any,
    suites: Suites,
    labels: Mapping[str, set[str] | None],
    spec: EvalSpec,
) -> dict[str, dict[str, TaskScore]]:
    return {
        name: evaluate(
            model,
            tokenizer,
            by_task,
            labels=labels,
            batch_size=spec.batch_size,
            max_new_tokens=spec.max_new_tokens,
            max_length=spec.max_length,
        )
        if by_task
        else {}
        for name, by_task in suites.items()
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


def _metrics(
    champion: dict[str, dict[str, TaskScore]], challenger: dict[str, dict[str, TaskScore]]
) -> dict[str, dict[str, Any]]:
    tasks = sorted({t for suite in challenger.values() for t in suite})
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        entry: dict[str, Any] = {"suites": {}}
        for who, scores in (("champion", champion), ("challenger", challenger)):
            parts = [scores[s][task] for s in ("regression", "gain") if task in scores[s]]
            entry[who] = _union(parts)
            for suite in ("regression", "gain"):
                if task in scores[suite]:
                    entry["suites"].setdefault(suite, {})[who] = score_dict(scores[suite][task])
        out[task] = entry
    return out


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


def run_cycle(
    store: ExampleStore,
    registry: Registry,
    state_dir: Path,
    *,
    base: str,
    lora: LoraSpec,
    train: TrainSpec,
    replay: ReplaySpec,
    ewc: EwcSpec,
    rules: GateRules,
    eval_spec: EvalSpec,
    export: ExportSpec | None = None,
    keep_bundles: int = 5,
    actor: str = "daemon",
    should_stop: Callable[[int, int], bool] | None = None,
) -> CycleResult:
    """Train → evaluate → gate → export + promote + publish, reject or wait. Resumable.

    With ``export`` set, a promotion also publishes the parity-checked bundle as latest;
    a failed export or parity check rejects the challenger instead.
    """
    timings: dict[str, float] = {}
    if export is not None:  # finish what a crash between promotion and publication left
        sync_latest(store, registry, state_dir, base=base, spec=export, keep=keep_bundles)
    waiting = registry.in_state(VersionState.AWAITING_APPROVAL)
    if waiting:
        raise CycleBlocked(
            f"v{waiting[0].version} awaits approval; run `aftertune approve {waiting[0].version}` "
            f"or `aftertune reject {waiting[0].version} --why ...` before the next cycle"
        )
    champion = registry.champion()
    challenger = _pick_challenger(registry, champion, actor)
    trained = None
    if challenger is None:
        t0 = time.monotonic()
        report = train_candidate(
            store, registry, state_dir, base=base, lora=lora, train=train, replay=replay,
            ewc=ewc, should_stop=should_stop, actor=actor,
        )  # fmt: skip
        timings["train_s"] = time.monotonic() - t0
        trained = report.to_json()
        challenger = registry.get(report.candidate)
        failpoint("cycle.after_train")
    else:
        log.info("resuming the cycle of v%d (%s)", challenger.version, challenger.state.value)
    if challenger.state is VersionState.CANDIDATE:
        registry.transition(
            challenger.version, VersionState.EVALUATING, actor=actor, reason="gate evaluation"
        )

    t0 = time.monotonic()
    champion_seq = champion.data_seq if champion is not None else 0
    suites = suites_for(store, champion_seq, challenger.data_seq, eval_spec.max_per_task)
    labels = label_sets(store, sorted({t for s in suites.values() for t in s}))
    model, tokenizer = champion_model(registry, base, state_dir, champion)
    champion_scores = _score(model, tokenizer, suites, labels, eval_spec)
    failpoint("cycle.during_eval")
    del model
    model, tokenizer = champion_model(registry, base, state_dir, challenger)
    challenger_scores = _score(model, tokenizer, suites, labels, eval_spec)
    del model
    timings["evaluate_s"] = time.monotonic() - t0

    def as_floats(score: TaskScore) -> dict[str, float]:
        return {k: float(v) for k, v in score_dict(score).items()}

    # A task "has a champion score" when the champion was judged on it before (it is in the
    # regression suite); a task new to the champion is held to value thresholds only.
    known = set(champion_scores["regression"])
    regression = {
        t: (as_floats(champion_scores["regression"][t]), as_floats(s))
        for t, s in challenger_scores["regression"].items()
    }
    gain = {
        t: (as_floats(champion_scores["gain"][t]) if t in known else None, as_floats(s))
        for t, s in challenger_scores["gain"].items()
    }
    new_tasks = set(challenger.lineage.get("trained_on", {}).get("count_by_task", {}))
    conflicts = store.conflicts(champion_seq, challenger.data_seq)
    gate = judge(regression, gain, new_tasks, rules, conflicts)
    metrics = _metrics(champion_scores, challenger_scores)
    registry.set_metrics(challenger.version, metrics)
    gate_json = gate.to_json()
    why = "; ".join(gate.reasons)
    decision, reasons, bundle = gate.decision, list(gate.reasons), None
    if gate.decision is Decision.PROMOTED:
        t0 = time.monotonic()
        try:
            bundle = promote_and_publish(
                store, registry, state_dir, challenger, base=base, spec=export,
                keep=keep_bundles, actor=actor, reason=why, gate=gate_json,
            )  # fmt: skip
        except ExportError as exc:
            decision, reasons, why = Decision.REJECTED, [f"export: {exc}"], f"export: {exc}"
        timings["publish_s"] = time.monotonic() - t0
    elif gate.decision is Decision.AWAITING_APPROVAL:
        registry.transition(
            challenger.version, VersionState.AWAITING_APPROVAL, actor=actor, reason=why,
            gate=gate_json,
        )  # fmt: skip
    else:
        # Set the batch aside before the decision is final, so a crash in between re-runs
        # to the same end. Waiting for held-out data is not a verdict on the data itself.
        if any(c.rule != "held_out_present" for c in gate.failures):
            store.quarantine(champion_seq, challenger.data_seq, challenger.version)
        registry.transition(
            challenger.version, VersionState.REJECTED, actor=actor, reason=why, gate=gate_json
        )
    log.info("v%d %s: %s", challenger.version, decision.value, why)
    return CycleResult(
        challenger.version, decision, reasons, metrics, gate, timings, trained, bundle
    )
