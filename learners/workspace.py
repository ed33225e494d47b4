"""One learning workspace: what the daemon and the CLI build once and ask to learn.

``Workspace(store, registry, state_dir, specs)`` holds what every step needs (a
``LearningState``) and offers the steps as methods: ``cycle`` (train or resume → score →
judge → promote, reject or wait), ``train`` (one candidate), ``evaluate`` (any version on
every task's held-out split, as the gate scores), ``export`` (a parity-checked bundle into a
new directory), ``stage`` (a bundle under ``bundles/vN``, unpublished), ``promote`` (export,
promote, publish as ``latest``) and ``sync_latest`` (after a crash or a rollback).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aftertune.learners.candidate import CandidateReport, train_candidate
from aftertune.learners.champion import load_version
from aftertune.learners.cycle import CycleResult, run_cycle
from aftertune.learners.evaluate import TaskScore, held_out
from aftertune.learners.export import ExportResult
from aftertune.learners.learning_state import LearningState
from aftertune.learners.promote import (
    export_version,
    promote_and_publish,
    stage_bundle,
    sync_latest,
)
from aftertune.learners.specs import LearningSpecs
from aftertune.store.bundles import Published
from aftertune.store.examples import ExampleStore
from aftertune.store.registry import Registry, Version

StopAsk = Callable[[int, int], bool]  # (step, total steps) → stop now?


class Workspace:
    """The store, the registry, the state dir and the specs, with the learning steps."""

    def __init__(
        self,
        store: ExampleStore,
        registry: Registry,
        state_dir: Path,
        specs: LearningSpecs,
        *,
        actor: str = "daemon",
    ) -> None:
        self.state = LearningState(store, registry, Path(state_dir), specs, actor)

    @property
    def specs(self) -> LearningSpecs:
        return self.state.specs

    def cycle(self, should_stop: StopAsk | None = None) -> CycleResult:
        """One whole cycle; resumes what an interrupted one left (learners/cycle.py)."""
        return run_cycle(self.state, should_stop=should_stop)

    def train(self, should_stop: StopAsk | None = None) -> CandidateReport:
        """Train and register one candidate on the data since the champion."""
        return train_candidate(self.state, should_stop=should_stop)

    def evaluate(self, version: Version | None) -> tuple[dict[str, TaskScore], dict[str, str]]:
        """Scores of ``version`` (None = base) on every task's held-out split, and the tasks its
        model kind refuses to score (task → why): what `aftertune eval` prints, scored as the
        gate scores (the same cap per task, answer sets and spec)."""
        state = self.state
        by_task = held_out(state.store, state.specs.eval.max_per_task)
        if not by_task:
            return {}, {}
        judged = state.kind.answer_sets(state.store, sorted(by_task), None, state.specs)
        scored = {t: v for t, v in by_task.items() if t not in judged.refused}
        model, tokenizer = load_version(state.registry, state.specs.base, state.state_dir, version)
        scores = state.kind.score(model, tokenizer, scored, judged.sets, state.specs)
        return scores, judged.refused

    def export(self, version: Version, out: Path) -> ExportResult:
        """``version`` as a parity-checked bundle in the empty directory ``out``, unpublished."""
        return export_version(self.state, version, out)

    def stage(self, version: Version) -> Path:
        """``version``'s bundle under ``bundles/vN``, not yet ``latest``."""
        return stage_bundle(self.state, version)

    def promote(
        self,
        version: Version,
        *,
        reason: str,
        gate: dict[str, Any] | None = None,
        override: bool = False,
    ) -> Published | None:
        """Export and check ``version``, make it the champion, publish it as ``latest``;
        ``override``: a version the gate rejected, promoted by an operator."""
        return promote_and_publish(self.state, version, reason=reason, gate=gate, override=override)

    def sync_latest(self) -> Published | None:
        """Point ``latest`` at the champion's bundle (exported again when missing)."""
        return sync_latest(self.state)
