"""The model-kind seam: what differs between a generative and a ranking base, in one place.

The kind follows from the base model (``base_model.model_kind``): a causal LM is
*generative* (answers by greedy decoding), a sentence encoder is *ranking* (answers with the
task's candidate nearest the prompt, ``ranking.py``). The cycle, the candidate trainer,
``aftertune eval`` and promotion ask the kind for four things and nothing else:

- ``objective``: the training loss the recipe, replay and EWC run (``objectives.py``);
- ``answer_sets``: per task, what an answer is judged against (label set / candidates), and
  the tasks this kind refuses with the reason;
- ``score``: per-task scores on held-out examples (the one scoring path);
- ``export``: the champion as a parity-checked bundle.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aftertune.learners.base_model import RANKING, model_kind
from aftertune.learners.errors import LearnerError
from aftertune.store.examples import Example, ExampleStore

if TYPE_CHECKING:
    from aftertune.learners.evaluate import TaskScore
    from aftertune.learners.export import ExportResult
    from aftertune.learners.objectives import Objective
    from aftertune.learners.specs import LearningSpecs

AnswerSets = Mapping[str, Collection[str] | None]


@dataclass(frozen=True)
class Judged:
    """What answers are judged against, per task, and the tasks refused (task → why)."""

    sets: dict[str, Collection[str] | None]
    refused: dict[str, str]


class ModelKind(Protocol):
    name: str

    def objective(
        self, tokenizer: Any, store: ExampleStore, until: int, specs: LearningSpecs
    ) -> Objective: ...

    def answer_sets(
        self, store: ExampleStore, tasks: Sequence[str], until: int | None, specs: LearningSpecs
    ) -> Judged: ...

    def score(
        self,
        model: Any,
        tokenizer: Any,
        by_task: Mapping[str, Sequence[Example]],
        sets: AnswerSets,
        specs: LearningSpecs,
    ) -> dict[str, TaskScore]: ...

    def export(
        self,
        model_dir: Path,
        staging: Path,
        specs: LearningSpecs,
        prompts: Sequence[tuple[str, str]],
        fields: Mapping[str, Any],
        adapter_dir: Path | None,
    ) -> ExportResult: ...


class Generative:
    """A causal LM: greedy answers, label sets or token F1, the genai/torch ONNX export."""

    name = "generative"

    def objective(
        self, tokenizer: Any, store: ExampleStore, until: int, specs: LearningSpecs
    ) -> Objective:
        from aftertune.learners.objectives import ResponseObjective

        return ResponseObjective(tokenizer)

    def answer_sets(
        self, store: ExampleStore, tasks: Sequence[str], until: int | None, specs: LearningSpecs
    ) -> Judged:
        from aftertune.learners.evaluate import label_sets

        return Judged(dict(label_sets(store, list(tasks))), {})

    def score(
        self,
        model: Any,
        tokenizer: Any,
        by_task: Mapping[str, Sequence[Example]],
        sets: AnswerSets,
        specs: LearningSpecs,
    ) -> dict[str, TaskScore]:
        from aftertune.learners.evaluate import score

        labels = {t: (set(s) if s is not None else None) for t, s in sets.items()}
        return score(model, tokenizer, by_task, labels, specs.eval)

    def export(
        self,
        model_dir: Path,
        staging: Path,
        specs: LearningSpecs,
        prompts: Sequence[tuple[str, str]],
        fields: Mapping[str, Any],
        adapter_dir: Path | None,
    ) -> ExportResult:
        from aftertune.learners.export import export_bundle

        if specs.export is None:
            raise LearnerError("export is disabled (export.enabled = false)")
        return export_bundle(model_dir, staging, specs.export, [p for _, p in prompts], fields)


class Ranking:
    """A sentence encoder: the nearest candidate answers; contrastive training."""

    name = "ranking"

    def objective(
        self, tokenizer: Any, store: ExampleStore, until: int, specs: LearningSpecs
    ) -> Objective:
        from aftertune.learners.ranking import RankingObjective

        judged = self.answer_sets(store, None, until, specs)
        candidates = {t: list(s) for t, s in judged.sets.items() if s is not None}
        return RankingObjective(
            tokenizer,
            candidates,
            specs.ranking,
            max_length=specs.train.max_length,
            template=specs.train.template,
        )

    def answer_sets(
        self,
        store: ExampleStore,
        tasks: Sequence[str] | None,
        until: int | None,
        specs: LearningSpecs,
    ) -> Judged:
        """Each task's candidates: its distinct live train outputs up to ``until``."""
        from aftertune.learners.ranking import candidates_of, refusal

        outputs = store.train_outputs(until)
        wanted = sorted(outputs) if tasks is None else list(tasks)
        sets: dict[str, Collection[str] | None] = {}
        refused: dict[str, str] = {}
        cap = specs.ranking.max_candidates
        for task in wanted:
            found = candidates_of(outputs.get(task, []), cap)
            sets[task] = found
            if found is None:
                refused[task] = refusal(task, outputs.get(task, []), cap)
        return Judged(sets, refused)

    def score(
        self,
        model: Any,
        tokenizer: Any,
        by_task: Mapping[str, Sequence[Example]],
        sets: AnswerSets,
        specs: LearningSpecs,
    ) -> dict[str, TaskScore]:
        from aftertune.learners.ranking_eval import rank_scores

        return rank_scores(model, tokenizer, by_task, sets, specs)

    def export(
        self,
        model_dir: Path,
        staging: Path,
        specs: LearningSpecs,
        prompts: Sequence[tuple[str, str]],
        fields: Mapping[str, Any],
        adapter_dir: Path | None,
    ) -> ExportResult:
        from aftertune.learners.ranking import load_candidates
        from aftertune.learners.ranking_export import export_ranking

        if specs.export is None:
            raise LearnerError("export is disabled (export.enabled = false)")
        if adapter_dir is None:
            raise LearnerError("a ranking bundle needs a trained version's candidates")
        return export_ranking(
            model_dir,
            staging,
            specs.export,
            max_length=specs.train.max_length,
            candidates=load_candidates(adapter_dir),
            prompts=prompts,
            manifest_fields=fields,
        )


def kind_for(base: str | Path) -> ModelKind:
    """The kind of ``base`` (``model.base``)."""
    return Ranking() if model_kind(base) == RANKING else Generative()
