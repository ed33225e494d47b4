"""One learning cycle's steps that the CLI and the daemon call: train a candidate, evaluate.

Train: the champion (base + promoted adapters, merged and cached) gets a fresh LoRA adapter
on the train examples that arrived since the champion was made, mixed with replay of what
it already saw, under the EWC penalty; the adapter enters the registry as a ``candidate``.
Evaluate: per task on its held-out split (the first ``eval.max_per_task`` of each), for
the champion and optionally a candidate. ``score`` is the one scoring path: ``aftertune
eval`` and the gate both go through it, with the same cap, label sets and spec.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aftertune.learners.base_model import load_tokenizer
from aftertune.learners.champion import load_version
from aftertune.learners.errors import NothingToTrain, TrainingInterrupted
from aftertune.learners.learning_state import LearningState
from aftertune.learners.lineage import candidate_lineage
from aftertune.learners.model_kind import AnswerSets
from aftertune.learners.objective import Objective
from aftertune.learners.recipe import TrainJob, TrainResult, train_adapter
from aftertune.learners.replay import past_wanted, sample_past, split_batch
from aftertune.learners.specs import LearningSpecs
from aftertune.learners.train_job import ModelSource, train_in_processes
from aftertune.learners.window import Watermarks, new_train
from aftertune.store.examples import Example
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry, Version

log = logging.getLogger(__name__)
progress_log = logging.getLogger("aftertune.progress")  # shown wherever progress is


@dataclass(frozen=True)
class CandidateReport:
    candidate: int
    parent: int | None
    new_examples: int
    replay_examples: int
    steps: int
    loss_first: float
    loss_last: float
    tokens_per_s: float
    fisher_seconds: float
    train_seconds: float
    truncated: int
    resumed_from_step: int
    adapted_modules: dict[str, int]  # the layers the adapter covers: leaf name -> how many

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, candidate: int, parent: int | None, result: TrainResult) -> CandidateReport:
        fields = {k: v for k, v in asdict(result).items() if k in cls.__dataclass_fields__}
        return cls(candidate=candidate, parent=parent, **fields)


@dataclass(frozen=True)
class TrainingData:
    """The records one candidate learns from: new since the champion, and the past it replays."""

    parent: int | None  # the champion's version (None: the base model)
    marks: Watermarks  # the champion's: each task's records after its mark are new
    until: int  # ... up to this seq (a resumed run keeps its own window)
    new: list[Example]
    past: list[Example]
    held_back: dict[str, int]  # tasks left out (waiting) -> their unchanged watermark


def _interrupted_window(layout: StateLayout, parent: int | None) -> int | None:
    """``until`` of a training run left with checkpoints on this champion, if any."""
    found = [
        until
        for work in layout.training_runs(parent or 0)
        if (work / "checkpoints").is_dir()
        and any((work / "checkpoints").iterdir())
        and (until := StateLayout.training_run_until(work)) is not None
    ]
    return max(found) if found else None


def window_until(state: LearningState, champion: Version | None) -> int:
    """Up to which seq this cycle's data goes: a run interrupted on this champion resumes on
    its own window, even when more records arrived since (they wait for the next cycle)."""
    parent = champion.version if champion is not None else None
    return _interrupted_window(state.layout, parent) or state.store.max_seq()


def training_data(
    state: LearningState, champion: Version | None, until: int, waiting: Collection[str] = ()
) -> TrainingData:
    """New train records since ``champion`` (but those of ``waiting`` tasks, which keep their
    watermark) and a sample of what it was trained on.

    Raises NothingToTrain when no new train record waits.
    """
    store, specs = state.store, state.specs
    marks = Watermarks.of(champion)
    parent = champion.version if champion is not None else None
    new = new_train(store, marks, until, without=waiting)
    if not new:
        made = f"v{champion.version}" if champion is not None else "the base model"
        raise NothingToTrain(
            f"no new train examples since {made} was made; push feedback and ingest it first"
        )
    # The past: what the champion was trained on (up to its watermark; a held-back task's
    # records above its own mark were not learned, so they are not replayed).
    wanted = past_wanted(specs.replay, specs.ewc)
    past = [
        ex
        for ex in sample_past(store, wanted, specs.train.seed, marks.base)
        if ex.seq <= marks.mark(ex.task)
    ]
    held = marks.holding_back({ex.task for ex in new_train(store, marks, until)} & set(waiting))
    return TrainingData(parent, marks, until, new, past, held)


def train_candidate(
    state: LearningState,
    *,
    should_stop: Callable[[int, int], bool] | None = None,
    waiting: Collection[str] = (),
) -> CandidateReport:
    """Train one candidate on the data that arrived since the champion, but ``waiting``
    tasks' (they keep their watermark); register it."""
    registry, specs = state.registry, state.specs
    champion = registry.champion()
    data = training_data(state, champion, window_until(state, champion), waiting)
    work = state.layout.training_run(data.parent, data.until)
    in_processes = specs.train.processes > 1 and state.kind.trains_in_processes
    if in_processes:  # the ranks load the model; this process needs the tokenizer
        model, tokenizer = None, load_tokenizer(specs.base)
    else:
        model, tokenizer = load_version(registry, specs.base, state.state_dir, champion)
    sets = state.kind.answer_sets(state.store, None, data.until, specs).sets
    objective = state.kind.objective(tokenizer, sets, specs)
    if not objective.kept(data.new, "new examples"):
        raise NothingToTrain(
            "every new train example belongs to a task this model kind cannot learn (see the"
            " warning above); nothing to train until other feedback arrives"
        )
    loaded = (model, tokenizer, objective, sets)
    _log_estimate(champion, data, specs)
    budget = Budget(specs.train.max_seconds, should_stop)
    try:
        result = _train(state, champion, data, work, budget.should_stop, loaded)
    except TrainingInterrupted as exc:
        if not budget.spent:
            raise
        raise TrainingInterrupted(exc.step, exc.checkpoint_dir, budget.why()) from exc
    objective.save_beside(result.adapter_dir)  # e.g. the candidates a ranking version knows
    version = _register(registry, specs, data, result, state.actor)
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "candidate v%d trained on %d new + %d replayed examples in %.1fs (%d steps)",
        version.version,
        len(data.new),
        result.replay_examples,
        result.train_seconds,
        result.steps,
    )
    return CandidateReport.of(version.version, data.parent, result)


class Budget:
    """A cycle's training time: asks the caller's ``should_stop`` too, and stops warm (after a
    checkpoint) once ``seconds`` are spent; the next cycle resumes from the checkpoint."""

    def __init__(self, seconds: float, then: Callable[[int, int], bool] | None) -> None:
        self.seconds, self.then = seconds, then
        self.started = time.monotonic()
        self.spent = False

    def should_stop(self, step: int, total: int) -> bool:
        if self.then is not None and self.then(step, total):
            return True
        self.spent = time.monotonic() - self.started >= self.seconds
        return self.spent

    def why(self) -> str:
        return (
            f"the cycle's training budget of {self.seconds:g} s (train.max_seconds) is spent;"
            " the next cycle resumes from the checkpoint"
        )


def _log_estimate(champion: Version | None, data: TrainingData, specs: LearningSpecs) -> None:
    """How long this cycle's training should take, from the last one's pace."""
    train, replay = specs.train, specs.replay
    done = champion.training if champion is not None else {}
    pace = float(done.get("train_seconds", 0.0)) / max(1, int(done.get("steps", 0) or 0))
    ratio = replay.ratio if replay.enabled and data.past else 0.0
    per_epoch = math.ceil(len(data.new) / split_batch(train.batch_size, ratio)[0])
    steps = train.max_steps or math.ceil(train.epochs * per_epoch / train.grad_accum)
    if done.get("steps") and pace > 0:
        progress_log.info(
            "training on %d new + %d past examples: about %d steps, about %.0f s at the last"
            " cycle's %.2f s a step (budget %g s, train.max_seconds)",
            len(data.new),
            len(data.past),
            steps,
            steps * pace,
            pace,
            train.max_seconds,
        )
    else:
        progress_log.info(
            "training on %d new + %d past examples: about %d steps (budget %g s,"
            " train.max_seconds); no earlier cycle to estimate the time from",
            len(data.new),
            len(data.past),
            steps,
            train.max_seconds,
        )


def _train(
    state: LearningState,
    champion: Version | None,
    data: TrainingData,
    work: Path,
    should_stop: Callable[[int, int], bool] | None,
    loaded: tuple[Any, Any, Objective, AnswerSets],
) -> TrainResult:
    """The adapter, trained here or, with ``train.processes`` > 1 on a kind that allows it,
    by torchrun."""
    specs = state.specs
    job = TrainJob.of(
        data.new,
        data.past,
        train=specs.train,
        lora=specs.lora,
        replay=specs.replay,
        ewc=specs.ewc if specs.ewc.enabled else None,
        out_dir=work / "adapter",
        fisher_path=state.layout.fisher,
        checkpoint_dir=work / "checkpoints",
    )
    model, tokenizer, objective, sets = loaded
    if model is None:
        chain = state.registry.chain(champion.version) if champion is not None else []
        source = ModelSource(specs.base, [v.adapter_dir for v in chain], state.layout.champions)
        return train_in_processes(
            specs.train.processes, source, job, sets=sets, specs=specs, should_stop=should_stop
        )
    return train_adapter(model, tokenizer, job, objective=objective, should_stop=should_stop)


def _register(
    registry: Registry,
    specs: LearningSpecs,
    data: TrainingData,
    result: TrainResult,
    actor: str,
) -> Version:
    lineage = candidate_lineage(
        registry,
        specs,
        parent=data.parent,
        new=data.new,
        past=data.past,
        seq_range=(data.marks.base, data.until),
    )
    if data.held_back:
        lineage["held_back"] = data.held_back
    return registry.register_candidate(
        result.adapter_dir,
        parent=data.parent,
        data_seq=data.until,
        training={k: v for k, v in asdict(result).items() if k != "adapter_dir"},
        lineage=lineage,
        actor=actor,
    )
