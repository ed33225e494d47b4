"""A model kind plugs in through the registry alone: a toy third kind, defined here in the
tests and registered with one call, runs a whole cycle through the learning workspace. The
cycle, the candidate trainer, evaluation, EWC and the recipe ask it what they need; nothing
else in the code base knows it exists."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from learner_fixtures import copy_task, save_tiny_base, single_thread  # noqa: F401 (autouse)

from aftertune.daemon.settings import load_settings
from aftertune.daemon.specs import specs_from
from aftertune.learners import kinds
from aftertune.learners.errors import LearnerError
from aftertune.learners.evaluate import TaskScore, normalize
from aftertune.learners.export import ExportResult
from aftertune.learners.kinds.generative.objective import ResponseObjective
from aftertune.learners.model_kind import AnswerSets, Judged
from aftertune.learners.objective import Objective
from aftertune.learners.specs import LearningSpecs
from aftertune.learners.workspace import Workspace
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.prompt import DEFAULT_PROMPT, PromptTemplate
from aftertune.store.records import record_from_obj
from aftertune.store.registry import Registry

pytestmark = pytest.mark.slow


class FirstLetter:
    """A toy kind: a causal LM trained on the response loss, judged by whether the first
    character of its greedy answer is the reference's (what the copy task asks)."""

    name = "first-letter"
    train_defaults: Mapping[str, Any] = {"lr": 5e-3, "epochs": 4}
    trains_in_processes = False
    judged_metrics = frozenset({"accuracy"})

    def __init__(self) -> None:
        self.calls: list[str] = []

    def accepts(self, config: Mapping[str, Any]) -> bool:
        return config.get("aftertune_kind") == self.name

    def default_prompt(self, base: str) -> PromptTemplate:
        return DEFAULT_PROMPT

    def objective(self, tokenizer: Any, sets: AnswerSets, specs: LearningSpecs) -> Objective:
        self.calls.append("objective")
        return ResponseObjective(tokenizer)

    def answer_sets(
        self,
        store: ExampleStore,
        tasks: Sequence[str] | None,
        until: int | None,
        specs: LearningSpecs,
    ) -> Judged:
        self.calls.append("answer_sets")
        outputs = store.train_outputs(until)
        wanted = sorted(outputs) if tasks is None else list(tasks)
        return Judged({t: sorted(set(outputs.get(t, []))) for t in wanted}, {})

    def score(
        self,
        model: Any,
        tokenizer: Any,
        by_task: Mapping[str, Sequence[Example]],
        sets: AnswerSets,
        specs: LearningSpecs,
    ) -> dict[str, TaskScore]:
        self.calls.append("score")
        out = {}
        for task, examples in by_task.items():
            hits = 0
            for ex in examples:
                prompt = specs.eval.template.render(ex.instruction, ex.input)
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                answer = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1] :]
                text = normalize(tokenizer.decode(answer, skip_special_tokens=True))
                hits += text[:1] == normalize(ex.output)[:1]
            n = len(examples)
            out[task] = TaskScore(task, "label", n, hits / n, None, 1.0, 1.0)
        return out

    def as_deployed(self, adapter_dir: Path | None, sets: AnswerSets) -> AnswerSets:
        return sets

    def export(
        self,
        model_dir: Path,
        staging: Path,
        specs: LearningSpecs,
        prompts: Sequence[tuple[str, str]],
        fields: Mapping[str, Any],
        adapter_dir: Path | None,
    ) -> ExportResult:
        raise LearnerError("the first-letter kind has no bundle format")


@pytest.fixture
def toy() -> Iterator[FirstLetter]:
    kind = FirstLetter()
    kinds.register(kind)
    try:
        yield kind
    finally:
        kinds.unregister(kind.name)


def _toy_base(path: Path) -> Path:
    base = save_tiny_base(path)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "aftertune_kind": FirstLetter.name}))
    return base


def test_a_registered_kind_is_found_for_its_base_and_forgotten_when_removed(
    toy: FirstLetter, tmp_path: Path
) -> None:
    base = _toy_base(tmp_path / "base")
    assert kinds.kind_for(base) is toy
    assert kinds.kind_for("embedded:tiny").name == "generative"
    assert kinds.kind_for("embedded:minilm").name == "ranking"
    kinds.unregister(toy.name)
    assert kinds.kind_for(base).name == "generative"  # a causal LM all the same


def test_a_toy_kind_runs_a_whole_cycle_through_the_workspace(
    toy: FirstLetter, tmp_path: Path
) -> None:
    base = _toy_base(tmp_path / "base")
    state = tmp_path / "state"
    settings = load_settings(
        overrides={
            "state_dir": str(state),
            "model": {"base": str(base)},
            "train": {"max_steps": 30, "progress": False, "checkpoint_every": 0},
            "export": {"enabled": False},
            "gate": {"beat_chance": False, "min_gain": 0.0},
        }
    )
    specs = specs_from(settings)
    assert (specs.train.lr, specs.train.epochs) == (5e-3, 4)  # the kind's train defaults
    rows = [
        {"task": ex.task, "instruction": ex.instruction, "input": ex.input, "output": ex.output}
        for ex in copy_task(60)
    ]
    records = [record_from_obj({**r, "split": "train"}) for r in rows[:48]]
    records += [record_from_obj({**r, "split": "test"}) for r in rows[48:]]
    with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:
        store.add(records)
        result = Workspace(store, registry, state, specs, actor="test").cycle()
        assert result.version == 1
        assert result.trained is not None and result.trained["steps"] == 30
        assert {"objective", "answer_sets", "score"} <= set(toy.calls)
        assert set(result.metrics) == {"copy"}
        assert registry.get(1).adapter_dir.is_dir()
