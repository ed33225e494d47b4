"""The ranking kind's Fisher: each example's squared gradient of the contrastive loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aftertune.learners.data import ExampleLike
from aftertune.learners.ewc import mean_squared_grads, target_weights
from aftertune.learners.objective import Objective
from aftertune.store.prompt import PromptTemplate


def ranking_fisher(
    objective: Objective,
    template: PromptTemplate,
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[ExampleLike],
    target_modules: Sequence[str],
    *,
    max_length: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """avalanche's importance with one example per batch: each example's squared gradient."""
    encoded, _ = objective.encode(
        tokenizer, examples, max_length=max_length, template=template, what="Fisher"
    )
    if not encoded:
        raise ValueError("cannot estimate a Fisher from zero ranked examples")

    def loss_fn(m: torch.nn.Module, chunk: Any) -> torch.Tensor:
        return objective.loss(m, chunk, device, device.type == "cuda")[0]

    batches = [[e] for e in encoded]
    return mean_squared_grads(model, batches, loss_fn, target_weights(model, target_modules))
