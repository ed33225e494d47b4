"""Greedy decoding: one way to decode, whether prompts come batched, one by one, or as text."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from aftertune.learners import curriculum
from aftertune.learners.base_model import EMBEDDED_TINY, load_base
from aftertune.learners.data import pad_id
from aftertune.learners.generate import greedy_answers, greedy_continuations


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return load_base(EMBEDDED_TINY)


def test_left_padded_batch_decodes_as_each_prompt_alone(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    rng = random.Random(3)
    # Prompts of different lengths, so the batch really is padded.
    prompts = [curriculum.sample(rng).prompt for _ in range(8)]
    ids = [tok.encode(p) for p in prompts]
    assert len({len(i) for i in ids}) > 1
    batched = greedy_continuations(model, tok, ids, max_new_tokens=12)
    alone = greedy_continuations(model, tok, ids, max_new_tokens=12, batch_size=1)
    assert batched == alone
    assert any(batched)  # non-empty answers, or the comparison says nothing
    assert all(tok.eos_token_id not in row for row in batched)  # cut before EOS
    texts = greedy_answers(model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert texts == [tok.decode(row, skip_special_tokens=True) for row in batched]


def test_pad_id_falls_back_to_eos_then_zero() -> None:
    assert pad_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
