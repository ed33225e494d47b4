"""The ranking kind: a sentence encoder answers with the nearest of a task's candidates."""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from aftertune.learners.base_model import RANKING, family_of, resolve_base
from aftertune.learners.errors import LearnerError
from aftertune.learners.evaluate import TaskScore
from aftertune.learners.export import ExportResult
from aftertune.learners.kinds.ranking.candidates import (
    AnswerSet,
    answer_set,
    candidates_of,
    load_candidates,
    load_exemplars,
    refusal,
    with_exemplars,
)
from aftertune.learners.kinds.ranking.export import export_ranking
from aftertune.learners.kinds.ranking.objective import RankingObjective
from aftertune.learners.kinds.ranking.scoring import rank_scores
from aftertune.learners.model_kind import AnswerSets, Judged
from aftertune.learners.objective import Objective
from aftertune.learners.specs import LearningSpecs
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.prompt import DEFAULT_PROMPT, PromptTemplate


class Ranking:
    """A sentence encoder: the nearest candidate answers; contrastive training."""

    name = RANKING
    # Two epochs at 1e-3 against the class prototypes, measured on every single-text label
    # task in docs/benchmarks.md (issue 23): at 2e-3 the binary sni_sst2 reached 68.5 %
    # against 71.0 % at 1e-3 (its frozen prototypes: 67.5 %).
    train_defaults: Mapping[str, Any] = {"lr": 1e-3, "epochs": 2}
    trains_in_processes = False  # its objective has not been run under torchrun
    # Accuracy, with its noise margin: a challenger at least as accurate everywhere is not
    # rejected because its temperature-0.05 softmax grew sharper (a higher NLL).
    judged_metrics = frozenset({"accuracy"})

    def accepts(self, config: Mapping[str, Any]) -> bool:
        return family_of(config) == RANKING

    def default_prompt(self, base: str) -> PromptTemplate:
        """``{input} [SEP] {instruction}`` (the base tokenizer's separator): the embedding is
        pooled over the input alone, read in the context of the instruction, and a long
        prompt is cut in its instruction, not its input. Pooled over the whole prompt, the
        task's constant instruction made up most of every embedding: on 800 held-out
        records, sni_sst2 71.0 % -> 74.3 %, sni_sentiment140 74.0 % -> 76.4 %
        (docs/benchmarks.md). A tokenizer without a separator keeps the generic layout,
        pooled whole."""
        sep = separator(resolve_base(base))
        if sep is None:
            return DEFAULT_PROMPT
        return PromptTemplate(f"{{input}} {sep} {{instruction}}", "{instruction}")

    def objective(self, tokenizer: Any, sets: AnswerSets, specs: LearningSpecs) -> Objective:
        # An AnswerSet goes through whole: a plain list of it would drop the exemplars, and
        # the version would then train against its answer texts and save no prototypes.
        candidates = {
            t: s if isinstance(s, AnswerSet) else list(s) for t, s in sets.items() if s is not None
        }
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
        """Each task's candidates: its distinct live train outputs up to ``until``, with a
        seeded sample of ``ranking.exemplars`` train prompts per candidate as their exemplars."""
        outputs = store.train_outputs(until)
        wanted = sorted(outputs) if tasks is None else list(tasks)
        sets: dict[str, Collection[str] | None] = {}
        refused: dict[str, str] = {}
        cap = specs.ranking.max_candidates
        for task in wanted:
            found = candidates_of(outputs.get(task, []), cap)
            k = specs.ranking.exemplars * len(found or ())
            drawn = store.sample_train(task, k, f"exemplars:{task}", until)
            sets[task] = answer_set(found, drawn, specs.train.template) if found else None
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
        return rank_scores(model, tokenizer, by_task, sets, specs.eval, specs.ranking)

    def as_deployed(self, adapter_dir: Path | None, sets: AnswerSets) -> AnswerSets:
        """Each task the version was trained on, answered among its own candidates and
        prototypes (the ones its bundle carries), not those drawn from data it never saw:
        the batch under judgment would otherwise move the champion's prototypes too (a
        label-flipped batch took a champion from 86 % to 70 % on its own held-out records).
        Tasks new to it, and the base, keep ``sets``."""
        if adapter_dir is None:
            return sets
        try:
            kept = with_exemplars(load_candidates(adapter_dir), load_exemplars(adapter_dir))
        except LearnerError:  # a version saved before it kept them: as before
            return sets
        return {t: (kept[t] if t in kept and s is not None else s) for t, s in sets.items()}

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
        if adapter_dir is None:
            raise LearnerError("a ranking bundle needs a trained version's candidates")
        return export_ranking(
            model_dir,
            staging,
            specs.export,
            max_length=specs.train.max_length,
            candidates=with_exemplars(load_candidates(adapter_dir), load_exemplars(adapter_dir)),
            prompts=prompts,
            manifest_fields=fields,
        )


@functools.lru_cache(maxsize=16)
def separator(model_dir: Path) -> str | None:
    """The text of the tokenizer's separator token (``[SEP]``), from its saved config."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            found = json.loads((model_dir / name).read_text(encoding="utf-8")).get("sep_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, dict):
            found = found.get("content")
        if isinstance(found, str) and found:
            return found
    return None
