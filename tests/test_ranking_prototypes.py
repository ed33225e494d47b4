"""The ranking kind answers with class prototypes: each candidate's anchor is the mean
embedding of its exemplar prompts (drawn from its train records), so a task whose answer
texts say nothing about their meaning is learned from its examples (real MiniLM where slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aftertune.learners.kinds.ranking.candidates import (
    AnswerSet,
    answer_set,
    exemplars_of,
    load_exemplars,
    save_exemplars,
    with_exemplars,
)
from aftertune.store.prompt import PromptTemplate
from aftertune.store.records import FEEDBACK_META

DEMO = Path(__file__).resolve().parents[1] / "daemon" / "demo_data" / "real"
# agnews with its answers renamed to codes whose text means nothing to the encoder
CODES = {"World": "k1", "Sports": "k2", "Business": "k3", "Science or Technology": "k4"}


class _Ex:
    def __init__(self, row: dict[str, Any]) -> None:
        self.task, self.instruction, self.input = row["task"], row["instruction"], row["input"]
        self.output = CODES[row["output"]]


def _coded(split: str, n: int) -> list[_Ex]:
    lines = (DEMO / f"agnews.{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [_Ex(json.loads(line)) for line in lines]


def test_an_answer_set_is_its_candidates_and_carries_each_ones_exemplars() -> None:
    template = PromptTemplate()
    rows = _coded("train", 12)
    found = answer_set(sorted(CODES.values()), rows, template)
    assert list(found) == ["k1", "k2", "k3", "k4"] and found == ("k1", "k2", "k3", "k4")
    assert sorted(found) == ["k1", "k2", "k3", "k4"]  # still a plain list where one is expected
    for answer, prompts in found.exemplars.items():
        want = [template.render(r.instruction, r.input) for r in rows if r.output == answer]
        assert list(prompts) == want
    # an answer nobody drew an exemplar for has none (it is then anchored at its own text)
    assert AnswerSet(["a", "b"], {"a": ["x"]}).exemplars == {"a": ("x",), "b": ()}
    assert exemplars_of({"t": found, "plain": ["a", "b"], "refused": None}) == {
        "t": {a: list(p) for a, p in found.exemplars.items() if p}
    }


def test_a_thumbs_down_is_no_exemplar_of_the_answer_it_rejects() -> None:
    rows = _coded("train", 4)
    down = _coded("train", 1)[0]
    down.input, down.output = "a wrong answer's prompt", rows[0].output
    down.meta = {FEEDBACK_META: {"rating": "down"}}  # type: ignore[attr-defined]
    found = answer_set(sorted(CODES.values()), [*rows, down], PromptTemplate())
    assert not any("a wrong answer's prompt" in p for p in found.exemplars[rows[0].output])
    assert sum(map(len, found.exemplars.values())) == len(rows)


def test_exemplars_survive_the_adapter_dir_and_an_old_version_has_none(tmp_path: Path) -> None:
    found = answer_set(sorted(CODES.values()), _coded("train", 12), PromptTemplate())
    save_exemplars(tmp_path, exemplars_of({"agnews": found}))
    again = with_exemplars({"agnews": list(found)}, load_exemplars(tmp_path))["agnews"]
    assert again == found and again.exemplars == found.exemplars
    assert load_exemplars(tmp_path / "older-version") == {}


@pytest.mark.slow
def test_prototypes_answer_a_task_whose_answer_texts_mean_nothing() -> None:
    import torch

    from aftertune.learners.base_model import EMBEDDED_MINILM, load_base
    from aftertune.learners.kinds.ranking.encoder import rank

    torch.set_num_threads(1)
    model, tokenizer = load_base(EMBEDDED_MINILM)
    template = PromptTemplate()
    train, test = _coded("train", 120), _coded("test", 40)
    answers = sorted(CODES.values())
    prompts = [template.render(r.instruction, r.input) for r in test]

    def accuracy(candidates: Any) -> float:
        sims = rank(model, tokenizer, prompts, candidates, max_length=256)
        picks = [answers[i] for i in sims.argmax(1).tolist()]
        return sum(p == r.output for p, r in zip(picks, test, strict=True)) / len(test)

    by_text = accuracy(answers)
    by_prototype = accuracy(answer_set(answers, train, template))
    assert by_prototype >= 0.7, (by_prototype, by_text)  # the frozen encoder, no training
    assert by_prototype >= by_text + 0.3, (by_prototype, by_text)


def test_a_later_tasks_version_keeps_the_prototypes_of_the_tasks_before_it(tmp_path: Path) -> None:
    """Continual: the version trained on a second task still carries the first task's
    exemplars (its bundle anchors both tasks at their prototypes), drawn from the store."""
    from aftertune.daemon.specs import default_specs
    from aftertune.learners.base_model import EMBEDDED_MINILM, load_tokenizer
    from aftertune.learners.kinds.ranking.kind import Ranking
    from aftertune.store.examples import ExampleStore
    from aftertune.store.records import record_from_obj

    def rows(task: str, n: int) -> list[Any]:
        lines = (DEMO / f"{task}.train.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        return [record_from_obj({**json.loads(line), "split": "train"}) for line in lines]

    specs = default_specs()
    with ExampleStore(tmp_path / "examples.sqlite3") as store:
        store.add(rows("agnews", 20))  # the first cycle's task
        first = store.max_seq()
        store.add(rows("sni_emotion", 20))  # the next cycle's
        kind = Ranking()
        sets = kind.answer_sets(store, None, store.max_seq(), specs).sets
        before = kind.answer_sets(store, None, first, specs).sets
    kind.objective(load_tokenizer(EMBEDDED_MINILM), sets, specs).save_beside(tmp_path)
    kept = load_exemplars(tmp_path)
    assert sorted(kept) == ["agnews", "sni_emotion"]
    assert sum(map(len, kept["agnews"].values())) == 20  # every agnews record, as before
    assert kept["agnews"] == {a: list(p) for a, p in before["agnews"].exemplars.items() if p}
