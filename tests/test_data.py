"""Encoding examples: response-only loss, truncation that never cuts the answer silently, batches."""

from __future__ import annotations

import logging

import pytest
import torch
from learner_fixtures import Ex, byte_tokenizer, single_thread, tiny_llama  # noqa: F401 (autouse)

from aftertune.learners.data import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_examples,
    response_loss,
)
from aftertune.store.prompt import PromptTemplate


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_labels_cover_exactly_the_response_and_eos(tok) -> None:
    e = encode_example(tok, Ex("t", "Say it", "abc", "xyz"), max_length=128)
    prompt = tok.encode("Instruction: Say it\nInput: abc\nResponse: ")
    assert e.input_ids == [*prompt, *tok.encode("xyz", add_special_tokens=False), tok.eos_token_id]
    assert e.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert e.labels[len(prompt) :] == e.input_ids[len(prompt) :]
    assert e.response_tokens == 4  # x, y, z, EOS
    assert not e.prompt_truncated and not e.response_truncated


def test_custom_template_is_used(tok) -> None:
    t = PromptTemplate(
        with_input="Q: {instruction} [{input}] A:", without_input="Q: {instruction} A:"
    )
    e = encode_example(tok, Ex("t", "hi", "", "yo"), max_length=64, template=t)
    assert tok.decode(e.input_ids).startswith("Q: hi A:yo")


def test_long_prompt_loses_its_middle_not_the_response(tok) -> None:
    ex = Ex("t", "classify", "x" * 200 + "TAIL", "label")
    e = encode_example(tok, ex, max_length=64)
    assert len(e.input_ids) == 64
    assert e.prompt_truncated and not e.response_truncated
    text = tok.decode(e.input_ids)
    assert text.startswith("Instruction: classify")
    assert "TAIL\nResponse: label" in text  # the tail of the prompt is kept next to the answer
    assert e.response_tokens == len("label") + 1


def test_response_that_cannot_fit_is_cut_and_counted(tok, caplog) -> None:
    examples = [Ex("t", "i", "in", "y" * 100), Ex("t", "i", "in", "ok"), Ex("t", "i" * 80, "", "z")]
    with caplog.at_level(logging.INFO, logger="aftertune.learners.data"):
        encoded, count = encode_examples(tok, examples, max_length=48)
    assert all(len(e.input_ids) <= 48 for e in encoded)
    assert [e.response_truncated for e in encoded] == [True, False, False]
    assert [e.prompt_truncated for e in encoded] == [True, False, True]
    assert (count.examples, count.prompt, count.response, count.truncated) == (3, 2, 1, 2)
    # The prompt keeps half the budget so the cut answer still has (part of) its question.
    assert encoded[0].labels.count(IGNORE_INDEX) == 24
    assert tok.decode(encoded[0].input_ids).endswith("Response: " + "y" * 24)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 of 3" in warnings[0].getMessage()
    assert any("2 of 3 examples had their prompt" in r.getMessage() for r in caplog.records)


def test_collate_pads_to_longest_and_masks(tok) -> None:
    a = encode_example(tok, Ex("t", "a", "", "1"), max_length=64)
    b = encode_example(tok, Ex("t", "a longer one", "with input", "22", weight=2.0), max_length=64)
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    width = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["input_ids"][0, len(a.input_ids) :] == tok.pad_token_id).all()
    assert (batch["labels"][0, len(a.input_ids) :] == IGNORE_INDEX).all()
    assert batch["weights"].tolist() == [1.0, 2.0]


def test_response_loss_ignores_prompt_and_applies_weights(tok) -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    a = encode_example(tok, Ex("t", "a", "x", "1"), max_length=64)
    b = encode_example(tok, Ex("t", "bb", "yy", "22"), max_length=64)
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Unit weights: the Hugging Face token mean over labels != -100.
    hf = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert torch.allclose(response_loss(logits, batch["labels"]), hf, atol=1e-5)
    # Changing prompt logits does not change the loss.
    garbled = logits.clone()
    garbled[:, : len(a.input_ids) - a.response_tokens - 1] += 5 * torch.randn_like(
        garbled[:, : len(a.input_ids) - a.response_tokens - 1]
    )
    single = collate([a], tok.pad_token_id)
    la = response_loss(logits[:1, : len(a.input_ids)], single["labels"])
    lg = response_loss(garbled[:1, : len(a.input_ids)], single["labels"])
    assert torch.allclose(la, lg)
    # Weight 0 on an example removes it from the loss.
    only_a = response_loss(logits, batch["labels"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(only_a, la, atol=1e-6)


def test_invalid_inputs_raise(tok) -> None:
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, Ex("t", "a", "", "b"), max_length=1)
    with pytest.raises(ValueError, match="weight"):
        encode_example(tok, Ex("t", "a", "", "b", weight=-1.0), max_length=16)
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)
