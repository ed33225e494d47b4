"""Evaluation on the real embedded tiny model: metrics, determinism, batching, learning signal."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from aftertune.learners.base_model import load_base
from aftertune.learners.evaluate import (
    TaskScore,
    exact_match,
    normalize,
    score_dict,
    task_kind,
    token_f1,
)
from aftertune.learners.kinds.generative.scoring import answer_budget, evaluate, predict, score_task
from aftertune.store.examples import Example


def _ex(task: str, instruction: str, input: str, output: str, i: int = 0) -> Example:
    return Example(
        seq=i, id=f"{task}-{i}", task=task, instruction=instruction, input=input, output=output,
        split="test",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return load_base("embedded:tiny")


def _parity(n: int, start: int = 0) -> list[Example]:
    # Inputs of varied length, so a batch really needs padding.
    return [
        _ex("parity", "Is the number even or odd?", str(7 ** (k % 9) + k), "even" if (7 ** (k % 9) + k) % 2 == 0 else "odd", k)
        for k in range(start, start + n)
    ]  # fmt: skip


def _words(n: int) -> list[Example]:
    words = ["banana", "kiwi", "sky", "tomato", "strength", "a", "queue", "rhythm", "idea", "zebra"]
    return [
        _ex("last_letter", "Write the last letter of the word.", w * (1 + k % 3), w[-1], k)
        for k, w in enumerate(words[i % len(words)] for i in range(n))
    ]


# --- pure metrics ---------------------------------------------------------------------------


def test_normalize_strips_casefolds_and_collapses_whitespace() -> None:
    assert normalize("  Even \n") == "even"
    assert normalize("Science  or\tTechnology") == "science or technology"
    assert normalize("STRASSE") == normalize("straße")  # casefold, not lower


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat", "cat sat", 1.0),  # articles and case do not count
        ("Cat, sat!", "cat sat", 1.0),  # nor punctuation
        ("cat", "cat sat", 2 * (1.0 * 0.5) / 1.5),  # precision 1, recall 1/2
        ("dog", "cat", 0.0),
        ("", "", 1.0),  # SQuAD v2: two empty answers agree
        ("", "cat", 0.0),
        ("cat cat", "cat", 2 * (0.5 * 1.0) / 1.5),  # bag of tokens: duplicates count once each
    ],
)
def test_token_f1(prediction: str, reference: str, expected: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_task_kind() -> None:
    kind, labels = task_kind(["POS", "NEG", "POS ", "NEG", "POS"])
    assert kind == "label" and labels == {"POS", "NEG"}
    # Every answer distinct: free text, even when short.
    assert task_kind(["water", "oxygen", "the sun", "iron"]) == ("text", None)
    assert task_kind([str(i % 30) for i in range(200)], max_labels=20) == ("text", None)
    assert task_kind([]) == ("text", None)


def test_score_task_accuracy_and_valid_share() -> None:
    examples = [_ex("t", "i", str(k), out, k) for k, out in enumerate(["yes", "no", "yes", "no"])]
    answers = [" Yes", "yes", "maybe", "NO  "]
    score = score_task("t", examples, answers, nll_sum=8.0, tokens=4, label_set={"yes", "no"})
    assert score.kind == "label"
    assert score.accuracy == pytest.approx(0.5)  # " Yes" and "NO  " match after normalising
    assert score.valid == pytest.approx(0.75)  # "maybe" is outside the label set
    assert score.nll == pytest.approx(2.0)
    assert score_dict(score) == {"accuracy": 0.5, "nll": 2.0, "n": 4, "valid": 0.75}

    text = score_task("t", examples[:2], ["yes", "nope"], 3.0, 3, label_set=None)
    assert text.kind == "text" and text.accuracy is None and text.valid is None
    assert score_dict(text) == {"token_f1": 0.5, "exact_match": 0.5, "nll": 1.0, "n": 2}


@pytest.mark.parametrize(
    ("prediction", "reference", "f1", "em"),
    [
        # A Chinese answer is one whitespace "token": word-level F1 gave these 0.
        ("医生", "一名医生", 2 * (1.0 * 0.5) / 1.5, 0.0),
        ("一名医生。", "一名医生", 1.0, 1.0),  # full-width punctuation is not an answer
        ("他在北京工作", "北京", 2 * (2 / 6 * 1.0) / (2 / 6 + 1.0), 0.0),
        ("«Le médecin»", "le médecin", 1.0, 1.0),  # Unicode quotes, and French is words
        ("The doctor, in (北京)", "doctor in 北京!", 1.0, 1.0),  # mixed scripts, articles
        ("お医者さん", "医者", 2 * (2 / 5 * 1.0) / (2 / 5 + 1.0), 0.0),  # kana too
    ],
)
def test_free_text_metrics_count_cjk_characters_and_drop_unicode_punctuation(
    prediction: str, reference: str, f1: float, em: float
) -> None:
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert exact_match(prediction, reference) == em


def test_answer_budget_follows_the_longest_reference_in_the_models_tokens(tiny: Any) -> None:
    tokenizer = tiny[1]
    # The embedded tokenizer is byte-level: a Chinese character costs 3 tokens, so the old
    # fixed 16 cut "指令微调让模型学会回答问题" (13 characters, 39 bytes) after 5 characters.
    references = ["北京", "指令微调让模型学会回答问题"]
    assert answer_budget(tokenizer, references, None, cap=256) == math.ceil(39 * 1.25) + 2
    summary = "a summary that runs well past sixteen tokens " * 10
    assert answer_budget(tokenizer, [summary], None, cap=256) == 256  # the cap holds
    # A label task: its longest label, plus EOS.
    assert answer_budget(tokenizer, references, {"yes", "maybe"}, cap=256) == 6


# --- the real tiny model ----------------------------------------------------------------------


def test_evaluate_is_deterministic(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    data = {"parity": _parity(12), "last_letter": _words(10)}
    labels = {"parity": {"even", "odd"}, "last_letter": None}
    first = evaluate(model, tokenizer, data, labels=labels, batch_size=8, max_new_tokens=6)
    second = evaluate(model, tokenizer, data, labels=labels, batch_size=8, max_new_tokens=6)
    assert first == second
    assert set(first) == {"parity", "last_letter"}
    assert first["parity"].kind == "label" and first["last_letter"].kind == "text"
    assert all(0 < s.nll < 20 for s in first.values())
    assert model.training is False


def test_batched_equals_unbatched(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    examples = _parity(9) + _words(7)  # mixed lengths: heavy left padding in a batch of 16
    batched, nll_b, tok_b = predict(model, tokenizer, examples, batch_size=16, max_new_tokens=6)
    single, nll_s, tok_s = predict(model, tokenizer, examples, batch_size=1, max_new_tokens=6)
    assert batched == single
    assert tok_b == tok_s
    assert nll_b == pytest.approx(nll_s, rel=1e-4)


def test_overlong_prompt_is_shortened_not_failed(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    long = _ex("t", "Write the last letter of the word.", "x" * 2000 + "q", "q")
    answers, nll_sum, tokens = predict(model, tokenizer, [long], max_length=128, max_new_tokens=4)
    assert len(answers) == 1 and "\n" not in answers[0]
    assert tokens == len(tokenizer.encode("q", add_special_tokens=False)) + 1  # answer + EOS
    assert nll_sum > 0


def test_training_on_the_reference_lowers_its_nll(tiny: tuple[Any, Any]) -> None:
    base, tokenizer = tiny
    model = copy.deepcopy(base)
    data = {"parity": _parity(8, start=100)}
    labels = {"parity": {"even", "odd"}}
    before: TaskScore = evaluate(model, tokenizer, data, labels=labels)["parity"]

    # A few full-parameter steps on exactly these prompts + answers (teacher-forced loss on
    # the answer tokens only): the evaluated NLL must fall and the answers must follow.
    rows = []
    for ex in data["parity"]:
        prompt = tokenizer.encode(f"Instruction: {ex.instruction}\nInput: {ex.input}\nResponse: ")
        answer = [*tokenizer.encode(ex.output, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in rows])
    labels_t = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    torch.manual_seed(0)
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels_t).loss.backward()
        optimizer.step()

    after = evaluate(model, tokenizer, data, labels=labels)["parity"]
    assert after.nll < before.nll - 0.5
    assert after.accuracy == 1.0 and after.valid == 1.0
    # The caller's base model is untouched by evaluation and by this test.
    assert evaluate(base, tokenizer, data, labels=labels)["parity"] == before
