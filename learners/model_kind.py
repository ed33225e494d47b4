"""What a model kind gives the generic code: the ``ModelKind`` protocol.

The cycle, the candidate trainer, ``aftertune eval`` and promotion ask a kind for these things
and nothing else:

- ``accepts``: whether a base model (its ``config.json``) is of this kind;
- ``objective``: the training loss the recipe, replay and EWC run (``objective.py``);
- ``answer_sets``: per task, what an answer is judged against (label set / candidates), and
  the tasks this kind refuses with the reason;
- ``score``: per-task scores on held-out examples (the one scoring path);
- ``as_deployed``: the answer sets a trained version answers with as deployed (the gate
  scores the champion so, not with sets drawn from the batch being judged);
- ``export``: the champion as a parity-checked bundle;
- ``train_defaults``: ``train.lr`` and ``train.epochs`` when the settings leave them unset;
- ``default_prompt``: the prompt template when the settings leave ``[prompt]`` unset;
- ``trains_in_processes``: whether ``train.processes`` > 1 may run its training under torchrun;
- ``judged_metrics``: the metrics the gate's rules watch for this kind (the ranking kind is
  judged on accuracy: the NLL of its sharpened softmax says how confident it is, not what a
  user gets).

Each kind lives in its own folder under ``kinds/``; ``kinds/__init__`` is their registry.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aftertune.learners.evaluate import TaskScore
from aftertune.learners.export import ExportResult
from aftertune.learners.objective import Objective
from aftertune.learners.specs import LearningSpecs
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.prompt import PromptTemplate

AnswerSets = Mapping[str, Collection[str] | None]


@dataclass(frozen=True)
class Judged:
    """What answers are judged against, per task, and the tasks refused (task → why)."""

    sets: dict[str, Collection[str] | None]
    refused: dict[str, str]


class ModelKind(Protocol):
    name: str
    train_defaults: Mapping[str, Any]  # "lr", "epochs": what unset train settings mean
    trains_in_processes: bool
    judged_metrics: frozenset[str]

    def accepts(self, config: Mapping[str, Any]) -> bool:
        """Whether a base with this ``config.json`` is of this kind."""
        ...

    def default_prompt(self, base: str) -> PromptTemplate:
        """The prompt template of a base of this kind when ``[prompt]`` is unset."""
        ...

    def objective(self, tokenizer: Any, sets: AnswerSets, specs: LearningSpecs) -> Objective:
        """The training loss, given the answer sets of the data it trains on."""
        ...

    def answer_sets(
        self,
        store: ExampleStore,
        tasks: Sequence[str] | None,
        until: int | None,
        specs: LearningSpecs,
    ) -> Judged:
        """Per task (None: every task with train data up to ``until``), what answers are
        judged against, and the tasks refused."""
        ...

    def score(
        self,
        model: Any,
        tokenizer: Any,
        by_task: Mapping[str, Sequence[Example]],
        sets: AnswerSets,
        specs: LearningSpecs,
    ) -> dict[str, TaskScore]: ...

    def as_deployed(self, adapter_dir: Path | None, sets: AnswerSets) -> AnswerSets:
        """``sets`` as the version trained into ``adapter_dir`` (None: the base) answers
        them once deployed: a kind whose answers depend on data the version keeps (the
        ranking kind's exemplars) swaps in what it kept; others return ``sets``."""
        ...

    def export(
        self,
        model_dir: Path,
        staging: Path,
        specs: LearningSpecs,
        prompts: Sequence[tuple[str, str]],
        fields: Mapping[str, Any],
        adapter_dir: Path | None,
    ) -> ExportResult: ...
