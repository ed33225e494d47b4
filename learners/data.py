"""Examples → token ids with a response-only loss, and the padded batches the recipe trains on.

Prompt and response are tokenised separately (prompt with the tokenizer's special tokens,
response without, then EOS), which is exactly what generation sees: the prompt's ids, then
the model's continuation. Labels are -100 on the prompt and on padding, so only the answer
is learned.

Truncation never cuts the answer silently: the prompt loses its middle first (the head
keeps the instruction, the tail keeps the ``Response:`` marker the answer follows); only
when the response alone does not fit is it cut, and every cut is counted and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from aftertune.learners.errors import LearnerError
from aftertune.store.prompt import DEFAULT_PROMPT, PromptTemplate

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class ExampleLike(Protocol):
    """What the learner needs of an example (the store's ``Example`` fits; ``weight`` optional)."""

    task: str
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Encoded:
    """One example as ids; ``labels`` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    weight: float
    task: str
    prompt_truncated: bool
    response_truncated: bool

    @property
    def response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass(frozen=True)
class TruncationCount:
    """How many of a set of examples lost part of their prompt or of their response."""

    examples: int = 0
    prompt: int = 0
    response: int = 0
    truncated: int = 0  # examples with anything cut (both cuts count once)


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise LearnerError(
            "the tokenizer has no eos_token_id; the learner appends EOS so the model learns"
            " where an answer ends. Set tokenizer.eos_token before training."
        )
    return int(eos)


def prompt_ids(tokenizer: Any, example: ExampleLike, template: PromptTemplate) -> list[int]:
    """The prompt's token ids, special tokens included: training and scoring tokenize it so."""
    return list(tokenizer.encode(template.render(example.instruction, example.input)))


def answer_ids(tokenizer: Any, output: str, *, eos_required: bool = True) -> list[int]:
    """The answer's token ids, then EOS (the model learns where an answer ends). Scoring a
    model whose tokenizer has no EOS (``eos_required=False``) leaves it out."""
    ids = list(tokenizer.encode(output, add_special_tokens=False))
    if eos_required or getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(_eos_id(tokenizer))
    return ids


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else EOS, else 0: padding is masked out of attention, losses
    and answers, so any id serves (training has already required an EOS by then)."""
    pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
    for candidate in (pad, eos):
        if candidate is not None:
            return int(candidate)
    return 0


def cut_middle(ids: list[int], keep: int) -> list[int]:
    """Keep ``keep`` ids by dropping the middle: half from the head (the instruction), the rest
    from the tail (the end of the input and the ``Response:`` marker the answer follows)."""
    if keep >= len(ids):
        return ids
    if keep <= 0:
        return []
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head) :]


def encode_example(
    tokenizer: Any,
    example: ExampleLike,
    *,
    max_length: int,
    template: PromptTemplate = DEFAULT_PROMPT,
) -> Encoded:
    """Tokenise one example into at most ``max_length`` ids with labels on the response only."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt = prompt_ids(tokenizer, example, template)
    response = answer_ids(tokenizer, example.output)
    prompt_cut = response_cut = False
    if len(prompt) + len(response) > max_length:
        # The prompt may shrink to half the budget before the response is touched: an answer
        # with no question left is worth less than a shortened one.
        prompt_floor = min(len(prompt), max_length // 2)
        prompt_keep = max(max_length - len(response), prompt_floor)
        prompt_cut = prompt_keep < len(prompt)
        prompt = cut_middle(prompt, prompt_keep)
        if len(prompt) + len(response) > max_length:
            response = response[: max_length - len(prompt)]
            response_cut = True
    weight = float(getattr(example, "weight", 1.0))
    if weight < 0:
        raise ValueError(f"example weight must be >= 0, got {weight} (task {example.task!r})")
    return Encoded(
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
        weight=weight,
        task=example.task,
        prompt_truncated=prompt_cut,
        response_truncated=response_cut,
    )


def encode_examples(
    tokenizer: Any,
    examples: Sequence[ExampleLike],
    *,
    max_length: int,
    template: PromptTemplate = DEFAULT_PROMPT,
    what: str = "examples",
) -> tuple[list[Encoded], TruncationCount]:
    """Encode many examples; count and log how many had their prompt or response cut."""
    encoded = [
        encode_example(tokenizer, ex, max_length=max_length, template=template) for ex in examples
    ]
    count = TruncationCount(
        examples=len(encoded),
        prompt=sum(e.prompt_truncated for e in encoded),
        response=sum(e.response_truncated for e in encoded),
        truncated=sum(e.prompt_truncated or e.response_truncated for e in encoded),
    )
    if count.response:
        log.warning(
            "%d of %d %s had their response cut to max_length=%d (the cut part is not learned);"
            " raise max_length or shorten the answers",
            count.response,
            count.examples,
            what,
            max_length,
        )
    if count.prompt:
        log.info(
            "%d of %d %s had their prompt shortened to fit max_length=%d",
            count.prompt,
            count.examples,
            what,
            max_length,
        )
    return encoded, count


def collate(batch: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch (right padding)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
    weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def left_pad(
    rows: Sequence[Sequence[int]], pad_token_id: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token rows for inference; return input ids, attention mask and position ids.

    Left padding puts every row's last token in the last column, where generation continues;
    the position ids make a padded row compute what it computes alone.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def response_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens, each weighted by its example's weight.

    With all weights 1 this is the usual token mean (what Hugging Face models compute from
    ``labels``). A batch without any response token gives 0 with a gradient path kept.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    token_w = (shift_labels != IGNORE_INDEX).float()
    if weights is not None:
        token_w = token_w * weights.to(token_w.device, token_w.dtype)[:, None]
    total = token_w.sum()
    return (per_token * token_w).sum() / total.clamp_min(1e-12)
