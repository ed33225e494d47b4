"""One learning cycle's steps that the CLI and the daemon call: train a candidate, evaluate.

Train: the champion (base + promoted adapters, merged and cached) gets a fresh LoRA adapter
on the train examples that arrived since the champion was made, mixed with replay of what
it already saw, under the EWC penalty; the adapter enters the registry as a ``candidate``.
Evaluate: per task on its held-out split, for the champion and optionally a candidate.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aftertune.learners.base_model import base_sha256
from aftertune.learners.champion import adapter_sha256, load_champion
from aftertune.learners.errors import NothingToTrain
from aftertune.learners.evaluate import TaskScore, evaluate, task_kind
from aftertune.learners.ewc import EwcSpec
from aftertune.learners.lora import LoraSpec
from aftertune.learners.recipe import TrainSpec, train_adapter
from aftertune.learners.replay import ReplaySpec
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ids_sha256(examples: Sequence[Example]) -> str:
    return hashlib.sha256("\n".join(sorted(e.id for e in examples)).encode()).hexdigest()


def champion_model(
    registry: Registry, base: str, state_dir: Path, version: Version | None, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``version`` (None = the base): base + its adapter chain merged."""
    chain = registry.chain(version.version) if version is not None else []
    return load_champion(
        base, [v.adapter_dir for v in chain], StateLayout(state_dir).champions, device=device
    )


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


def train_candidate(
    store: ExampleStore,
    registry: Registry,
    state_dir: Path,
    *,
    base: str,
    lora: LoraSpec,
    train: TrainSpec,
    replay: ReplaySpec,
    ewc: EwcSpec,
    should_stop: Callable[[int, int], bool] | None = None,
    actor: str = "daemon",
) -> CandidateReport:
    """Train one candidate on the data that arrived since the champion; register it."""
    champion = registry.champion()
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
    # The past: what the champion was trained on (everything up to its watermark).
    wanted = max(replay.cap if replay.enabled else 0, ewc.fisher_samples if ewc.enabled else 0)
    past = store.replay_sample(wanted, seed=train.seed, until=watermark) if watermark else []
    model, tokenizer = champion_model(registry, base, state_dir, champion)
    layout = StateLayout(state_dir)
    work = layout.training_run(parent, until)
    result = train_adapter(
        model,
        tokenizer,
        new,
        past,
        train=train,
        lora=lora,
        replay_spec=replay,
        ewc=ewc if ewc.enabled else None,
        fisher_path=layout.fisher,
        out_dir=work / "adapter",
        checkpoint_dir=work / "checkpoints",
        should_stop=should_stop,
    )
    chain = registry.chain(parent) if parent is not None else []
    lineage = {
        "base": base,
        "base_sha256": base_sha256(base),
        "adapters": [
            {"version": v.version, "sha256": adapter_sha256(v.adapter_dir)} for v in chain
        ],
        "parent": parent,
        "trained_on": {
            "count_by_task": dict(Counter(e.task for e in new)),
            "ids_sha256": _ids_sha256(new),
            "seq_range": [watermark, until],
        },
        "replayed": dict(Counter(e.task for e in past)) if replay.enabled else {},
        "config": {
            "lora": asdict(lora),
            "train": {k: v for k, v in asdict(train).items() if k != "template"},
            "replay": asdict(replay),
            "ewc": asdict(ewc),
        },
    }
    training = {k: v for k, v in asdict(result).items() if k != "adapter_dir"}
    version = registry.register_candidate(
        result.adapter_dir,
        parent=parent,
        data_seq=until,
        training=training,
        lineage=lineage,
        actor=actor,
    )
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "candidate v%d trained on %d new + %d replayed examples in %.1fs (%d steps)",
        version.version,
        len(new),
        result.replay_examples,
        result.train_seconds,
        result.steps,
    )
    return CandidateReport(
        candidate=version.version,
        parent=parent,
        new_examples=len(new),
        replay_examples=result.replay_examples,
        steps=result.steps,
        loss_first=result.loss_first,
        loss_last=result.loss_last,
        tokens_per_s=result.tokens_per_s,
        fisher_seconds=result.fisher_seconds,
        train_seconds=result.train_seconds,
        truncated=result.truncated,
        resumed_from_step=result.resumed_from_step,
    )


def held_out_by_task(store: ExampleStore, until: int | None = None) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for example in store.held_out(until=until):
        out.setdefault(example.task, []).append(example)
    return out


def label_sets(store: ExampleStore, tasks: Sequence[str]) -> dict[str, set[str] | None]:
    """Each task's label set, judged on all its outputs (None = free-text task)."""
    return {task: task_kind(store.outputs(task))[1] for task in tasks}


def evaluate_version(
    store: ExampleStore,
    registry: Registry,
    state_dir: Path,
    *,
    base: str,
    version: Version | None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    max_length: int = 256,
) -> dict[str, TaskScore]:
    """Scores of ``version`` (None = base) on every task's held-out split."""
    by_task = held_out_by_task(store)
    if not by_task:
        return {}
    model, tokenizer = champion_model(registry, base, state_dir, version)
    return evaluate(
        model,
        tokenizer,
        by_task,
        labels=label_sets(store, list(by_task)),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
    )
