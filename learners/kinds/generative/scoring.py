"""Scoring a generative model: greedy answers against each task's references.

Per task: exact match (normalised) and the valid-answer share for label tasks, SQuAD-style
token F1 and exact match for free text (``evaluate.py``'s metrics), and for every task the
mean negative log-likelihood of the reference answer per response token (teacher-forced).
NLL moves before accuracy does, so the gate and the forgetting benchmarks watch it even
where a tiny model never gets the answer right.

Generation is greedy and batched with left padding; explicit position ids make a padded
batch compute exactly what each example computes alone (tests check batched == unbatched).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aftertune.learners.data import answer_ids, cut_middle, left_pad, pad_id, prompt_ids
from aftertune.learners.evaluate import (
    DEFAULT_MAX_LENGTH,
    EvalSpec,
    TaskScore,
    exact_match,
    normalize,
    task_kind,
    token_f1,
)
from aftertune.learners.generate import greedy_continuations
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.progress import Progress
from aftertune.store.prompt import DEFAULT_PROMPT, PromptTemplate


@dataclass(frozen=True)
class _Encoded:
    prompt: list[int]
    answer: list[int]  # reference answer tokens, EOS included when the tokenizer has one


def _encode(
    tokenizer: Any, example: Example, template: PromptTemplate, max_length: int, room: int
) -> _Encoded:
    # Tokenised as the recipe's data.encode_example does, so the NLL here is the training
    # loss on the same tokens.
    prompt = prompt_ids(tokenizer, example, template)
    answer = answer_ids(tokenizer, example.output, eos_required=False)[: max(1, max_length // 2)]
    # `room` reserves space for what follows the prompt (the answer, or generated tokens).
    keep = max(1, max_length - max(room, len(answer)))
    # The same middle cut as the training data (data.encode_example).
    return _Encoded(prompt=cut_middle(prompt, keep), answer=answer)


def _answer_nll(
    model: Any, batch: Sequence[_Encoded], pad: int, device: str | torch.device
) -> tuple[float, int]:
    """Summed NLL of the reference answers (teacher-forced) and how many tokens it covers."""
    rows = [e.prompt + e.answer for e in batch]
    ids, mask, positions = left_pad(rows, pad, device)
    longest = max(len(e.answer) for e in batch)
    # Left padding puts every answer at the end of its row: the logits of the last
    # `longest + 1` positions are all we need, which keeps a large vocabulary cheap.
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=longest + 1
    )
    logprobs = torch.log_softmax(out.logits[:, :-1, :].float(), dim=-1)  # predicts next token
    targets = ids[:, -longest:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (batch, longest)
    lengths = torch.tensor([len(e.answer) for e in batch], device=picked.device)
    keep = torch.arange(longest, device=picked.device).unsqueeze(0) >= (longest - lengths)[:, None]
    # where, not multiply: fully padded query rows can hold NaN, and NaN * 0 is NaN.
    total = torch.where(keep, picked, torch.zeros_like(picked)).sum()
    return float(-total), int(keep.sum())


def _answers(
    model: Any,
    tokenizer: Any,
    batch: Sequence[_Encoded],
    max_new_tokens: int,
    device: str | torch.device,
    stop_at_newline: bool = True,
) -> list[str]:
    """Greedy answers for a batch of prompts, cut at EOS and (unless the task's answers span
    lines) at the first newline."""
    prompts = [e.prompt for e in batch]
    continuations = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, device=device
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in continuations]
    # The template separates fields by newlines: a newline ends a one-line answer.
    return [t.split("\n", 1)[0] for t in texts] if stop_at_newline else texts


ANSWER_MARGIN = 1.25  # free-text budget: the longest reference answer, 25 % more, + EOS + 1


def answer_budget(
    tokenizer: Any, references: Sequence[str], label_set: set[str] | None, cap: int
) -> int:
    """New tokens a task's answers may take: its longest label + EOS for a label task; for
    free text the longest reference answer in this tokenizer's tokens (bytes, for a
    byte-level model: a Chinese character is 3) with a margin, at most ``cap``."""
    if label_set:
        # A longer answer cannot be a label, and a label longer than the free-text budget
        # ("Science or Technology") must not be cut.
        return 1 + max(len(tokenizer.encode(x, add_special_tokens=False)) for x in label_set)
    longest = max(
        (len(tokenizer.encode(r, add_special_tokens=False)) for r in references), default=0
    )
    return max(1, min(cap, math.ceil(longest * ANSWER_MARGIN) + 2))


@torch.no_grad()
def predict(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device = "cpu",
    template: PromptTemplate = DEFAULT_PROMPT,
    stop_at_newline: bool = True,
) -> tuple[list[str], float, int]:
    """Greedy answers (in input order), summed reference NLL and the token count it covers."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit:
        max_length = min(max_length, int(limit))
    pad = pad_id(tokenizer)
    encoded = [_encode(tokenizer, ex, template, max_length, max_new_tokens) for ex in examples]
    # Similar lengths together: less padding, fewer wasted FLOPs; order restored below.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt))
    answers: list[str] = [""] * len(encoded)
    nll_sum, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [encoded[i] for i in idx]
            s, t = _answer_nll(model, batch, pad, device)
            nll_sum, tokens = nll_sum + s, tokens + t
            for i, text in zip(
                idx,
                _answers(model, tokenizer, batch, max_new_tokens, device, stop_at_newline),
                strict=True,
            ):
                answers[i] = text
    finally:
        model.train(was_training)
    return answers, nll_sum, tokens


def score_task(
    task: str,
    examples: Sequence[Example],
    answers: Sequence[str],
    nll_sum: float,
    tokens: int,
    label_set: set[str] | None,
) -> TaskScore:
    """Turn predictions into a TaskScore; ``label_set`` None means a free-text task."""
    n = len(examples)
    nll = nll_sum / tokens if tokens else float("nan")
    if label_set is None:
        pairs = list(zip(answers, examples, strict=True))
        f1 = sum(token_f1(a, ex.output) for a, ex in pairs) / n if n else 0.0
        em = sum(exact_match(a, ex.output) for a, ex in pairs) / n if n else 0.0
        return TaskScore(task, "text", n, None, f1, nll, None, em)
    labels = {normalize(label) for label in label_set}
    hits = sum(
        normalize(a) == normalize(ex.output) for a, ex in zip(answers, examples, strict=True)
    )
    valid = sum(normalize(a) in labels for a in answers)
    return TaskScore(task, "label", n, hits / n if n else 0.0, None, nll, valid / n if n else 0.0)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples_by_task: Mapping[str, Sequence[Example]],
    *,
    labels: Mapping[str, set[str] | None] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device = "cpu",
    template: PromptTemplate = DEFAULT_PROMPT,
) -> dict[str, TaskScore]:
    """Score ``model`` on every task's examples (the model must already sit on ``device``).

    ``max_new_tokens`` caps free-text answers, whose budget follows the longest reference
    answer (:func:`answer_budget`); a label task generates its longest label plus EOS. ``labels`` gives each task's label set (None: free text). A task missing from it is
    classified by :func:`task_kind` on the evaluated examples' own outputs; pass the label
    sets learned from train data where held-out sets are small.
    """
    scores: dict[str, TaskScore] = {}
    tasks = sorted(examples_by_task)
    for task in Progress(f"evaluate {len(tasks)} tasks", len(tasks), "task").track(tasks):
        examples = list(examples_by_task[task])
        if labels is not None and task in labels:
            label_set = labels[task]
        else:
            label_set = task_kind([ex.output for ex in examples])[1]
        references = [ex.output for ex in examples]
        budget = answer_budget(tokenizer, references, label_set, max_new_tokens)
        answers, nll_sum, tokens = predict(
            model,
            tokenizer,
            examples,
            batch_size=batch_size,
            max_new_tokens=budget,
            max_length=max_length,
            device=device,
            template=template,
            stop_at_newline=not any("\n" in r.strip() for r in references),
        )
        scores[task] = score_task(task, examples, answers, nll_sum, tokens, label_set)
    return scores


def label_sets(store: ExampleStore, tasks: Sequence[str]) -> dict[str, set[str] | None]:
    """Each task's label set, judged on all its outputs (None = free-text task)."""
    return {task: task_kind(store.outputs(task))[1] for task in tasks}


def score(
    model: Any,
    tokenizer: Any,
    by_task: Mapping[str, Sequence[Example]],
    labels: Mapping[str, set[str] | None],
    spec: EvalSpec,
) -> dict[str, TaskScore]:
    """Scores of ``model`` per task: what `aftertune eval` prints and the gate judges."""
    if not by_task:
        return {}
    return evaluate(
        model,
        tokenizer,
        by_task,
        labels=labels,
        batch_size=spec.batch_size,
        max_new_tokens=spec.max_new_tokens,
        max_length=spec.max_length,
        template=spec.template,
    )
