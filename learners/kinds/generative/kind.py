"""The generative kind: a causal LM answers by greedy decoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aftertune.learners.base_model import GENERATIVE, family_of
from aftertune.learners.errors import LearnerError
from aftertune.learners.evaluate import TaskScore
from aftertune.learners.export import ExportResult
from aftertune.learners.kinds.generative.export import export_bundle
from aftertune.learners.kinds.generative.objective import ResponseObjective
from aftertune.learners.kinds.generative.scoring import label_sets, score
from aftertune.learners.model_kind import AnswerSets, Judged
from aftertune.learners.objective import Objective
from aftertune.learners.specs import LearningSpecs
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.prompt import DEFAULT_PROMPT, PromptTemplate


class Generative:
    """A causal LM: greedy answers, label sets or token F1, the genai/torch ONNX export."""

    name = GENERATIVE
    # The tiny generative base takes a high LoRA lr over a few epochs (docs/benchmarks.md).
    train_defaults: Mapping[str, Any] = {"lr": 4e-3, "epochs": 3}
    trains_in_processes = True
    judged_metrics = frozenset({"accuracy", "token_f1", "valid", "nll"})

    def accepts(self, config: Mapping[str, Any]) -> bool:
        return family_of(config) == GENERATIVE

    def default_prompt(self, base: str) -> PromptTemplate:
        return DEFAULT_PROMPT  # the layout the shipped base was pretrained on

    def objective(self, tokenizer: Any, sets: AnswerSets, specs: LearningSpecs) -> Objective:
        return ResponseObjective(tokenizer)

    def answer_sets(
        self,
        store: ExampleStore,
        tasks: Sequence[str] | None,
        until: int | None,
        specs: LearningSpecs,
    ) -> Judged:
        wanted = sorted(store.train_outputs(until)) if tasks is None else list(tasks)
        return Judged(dict(label_sets(store, wanted)), {})

    def score(
        self,
        model: Any,
        tokenizer: Any,
        by_task: Mapping[str, Sequence[Example]],
        sets: AnswerSets,
        specs: LearningSpecs,
    ) -> dict[str, TaskScore]:
        labels = {t: (set(s) if s is not None else None) for t, s in sets.items()}
        return score(model, tokenizer, by_task, labels, specs.eval)

    def as_deployed(self, adapter_dir: Path | None, sets: AnswerSets) -> AnswerSets:
        return sets  # the label sets are the data's; nothing of them is kept in a version

    def export(
        self,
        model_dir: Path,
        staging: Path,
        specs: LearningSpecs,
        prompts: Sequence[tuple[str, str]],
        fields: Mapping[str, Any],
        adapter_dir: Path | None,
    ) -> ExportResult:
        if specs.export is None:
            raise LearnerError("export is disabled (export.enabled = false)")
        return export_bundle(model_dir, staging, specs.export, [p for _, p in prompts], fields)
