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
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aftertune.learners.base_model import GENERATIVE, load_tokenizer, model_kind
from aftertune.learners.champion import load_version
from aftertune.learners.errors import NothingToTrain
from aftertune.learners.kinds import kind_for
from aftertune.learners.lineage import candidate_lineage
from aftertune.learners.objectives import Objective
from aftertune.learners.recipe import TrainResult, train_adapter
from aftertune.learners.specs import LearningSpecs
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry, Version

log = logging.getLogger(__name__)


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
    watermark: int  # the champion's data_seq: new records come after it
    until: int  # ... up to this seq (a resumed run keeps its own window)
    new: list[Example]
    past: list[Example]


def _interrupted_window(state_dir: Path, parent: int | None) -> int | None:
    """``until`` of a training run left with checkpoints on this champion, if any."""
    found = [
        until
        for work in StateLayout(state_dir).training_runs(parent or 0)
        if (work / "checkpoints").is_dir()
        and any((work / "checkpoints").iterdir())
        and (until := StateLayout.training_run_until(work)) is not None
    ]
    return max(found) if found else None


def training_data(
    store: ExampleStore, state_dir: Path, champion: Version | None, specs: LearningSpecs
) -> TrainingData:
    """New train records since ``champion`` and a sample of what it was trained on.

    Raises NothingToTrain when no new train record waits.
    """
    watermark = champion.data_seq if champion is not None else 0
    parent = champion.version if champion is not None else None
    # A run interrupted on this champion resumes on its own data window, even when more
    # records arrived since; they wait for the next cycle.
    until = _interrupted_window(state_dir, parent) or store.max_seq()
    new = store.train_after(watermark, until)
    if not new:
        made = f"v{champion.version}" if champion is not None else "the base model"
        raise NothingToTrain(
            f"no new train examples since {made} was made; push feedback and ingest it first"
        )
    replay, ewc = specs.replay, specs.ewc
    # The past: what the champion was trained on (everything up to its watermark).
    wanted = max(replay.cap if replay.enabled else 0, ewc.fisher_samples if ewc.enabled else 0)
    past = store.replay_sample(wanted, seed=specs.train.seed, until=watermark) if watermark else []
    return TrainingData(parent, watermark, until, new, past)


def train_candidate(
    store: ExampleStore,
    registry: Registry,
    state_dir: Path,
    specs: LearningSpecs,
    *,
    should_stop: Callable[[int, int], bool] | None = None,
    actor: str = "daemon",
) -> CandidateReport:
    """Train one candidate on the data that arrived since the champion; register it."""
    champion = registry.champion()
    data = training_data(store, state_dir, champion, specs)
    work = StateLayout(state_dir).training_run(data.parent, data.until)
    if _in_processes(specs):  # the ranks load the model; this process needs the tokenizer
        model, tokenizer = None, load_tokenizer(specs.base)
    else:
        model, tokenizer = load_version(registry, specs.base, state_dir, champion)
    objective = kind_for(specs.base).objective(tokenizer, store, data.until, specs)
    if not objective.kept(data.new, "new examples"):
        raise NothingToTrain(
            "every new train example belongs to a task this model kind cannot learn (see the"
            " warning above); nothing to train until other feedback arrives"
        )
    result = _train(
        registry, state_dir, champion, specs, data, work, should_stop, (model, tokenizer, objective)
    )
    objective.save_beside(result.adapter_dir)  # e.g. the candidates a ranking version knows
    version = _register(registry, specs, data, result, actor)
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


def _train(
    registry: Registry,
    state_dir: Path,
    champion: Version | None,
    specs: LearningSpecs,
    data: TrainingData,
    work: Path,
    should_stop: Callable[[int, int], bool] | None,
    loaded: tuple[Any, Any, Objective],
) -> TrainResult:
    """The adapter, trained here or, with ``train.processes`` > 1, by torchrun (generative
    kind only: the ranking objective runs in this process)."""
    common: dict[str, Any] = {
        "train": specs.train,
        "lora": specs.lora,
        "replay_spec": specs.replay,
        "ewc": specs.ewc if specs.ewc.enabled else None,
        "fisher_path": StateLayout(state_dir).fisher,
        "out_dir": work / "adapter",
        "checkpoint_dir": work / "checkpoints",
        "should_stop": should_stop,
    }
    model, tokenizer, objective = loaded
    if _in_processes(specs):
        from aftertune.learners.train_job import ModelSource, train_in_processes

        chain = registry.chain(champion.version) if champion is not None else []
        source = ModelSource(
            specs.base, [v.adapter_dir for v in chain], StateLayout(state_dir).champions
        )
        return train_in_processes(specs.train.processes, source, data.new, data.past, **common)
    return train_adapter(model, tokenizer, data.new, data.past, objective=objective, **common)


def _in_processes(specs: LearningSpecs) -> bool:
    """Whether torchrun trains this cycle: ``train.processes`` > 1, generative kind only."""
    return specs.train.processes > 1 and model_kind(specs.base) == GENERATIVE


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
        seq_range=(data.watermark, data.until),
    )
    return registry.register_candidate(
        result.adapter_dir,
        parent=data.parent,
        data_seq=data.until,
        training={k: v for k, v in asdict(result).items() if k != "adapter_dir"},
        lineage=lineage,
        actor=actor,
    )
