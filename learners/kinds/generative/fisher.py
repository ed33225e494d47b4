"""The generative kind's Fisher: the squared gradient of the response loss, per example.

The definition is avalanche's ``EWCPlugin`` importance (``ewc.mean_squared_grads``); the
per-sample path computes it several examples per backward pass (~2x faster on the embedded
model) and is what the learning cycle uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from aftertune.learners.data import (
    Encoded,
    ExampleLike,
    collate,
    encode_examples,
    pad_id,
    response_loss,
)
from aftertune.learners.ewc import mean_squared_grads, target_linears, target_weights
from aftertune.learners.lora import is_conv1d


def _response_logits(
    model: nn.Module, chunk: Sequence[Encoded], pad: int, dev: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of one collated chunk, as the training loop computes them, and the batch."""
    b = {k: v.to(dev) for k, v in collate(chunk, pad).items()}
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return logits, b


def estimate_fisher(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[ExampleLike],
    target_modules: Sequence[str],
    *,
    batch_size: int = 1,
    max_length: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` on ``examples`` over the targeted linear-like weights.

    Keys are module names + ``.weight`` as in the plain (not peft-wrapped) model; the loss is
    the training loss (response tokens only, example weights applied).
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    encoded, _ = encode_examples(tokenizer, examples, max_length=max_length, what="Fisher examples")
    pad = pad_id(tokenizer)
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]

    def loss_fn(m: nn.Module, chunk: Any) -> torch.Tensor:
        logits, b = _response_logits(m, chunk, pad, dev)
        return response_loss(logits, b["labels"], b["weights"])

    return mean_squared_grads(model, batches, loss_fn, target_weights(model, target_modules))


def estimate_fisher_per_sample(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[ExampleLike],
    target_modules: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """``estimate_fisher(batch_size=1)``, computed ``batch_size`` examples per backward pass.

    For a Linear layer the gradient of example i's loss is Σ_t g_it ⊗ x_it (g: gradient at the
    layer's output, x: its input). Examples in a right-padded causal batch never see each
    other, so one backward of Σ_i L_i yields every g_i; hooks square each example's gradient
    before the batch sum would mix them.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    encoded, _ = encode_examples(tokenizer, examples, max_length=max_length, what="Fisher examples")
    if not encoded:
        raise ValueError("cannot estimate a Fisher from zero examples")
    modules = target_linears(model, target_modules)
    weights = {
        f"{name}.weight": cast(torch.Tensor, module.weight) for name, module in modules.items()
    }
    sums = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()}
    pad = pad_id(tokenizer)

    def loss_fn(m: nn.Module, chunk: Any) -> torch.Tensor:
        logits, b = _response_logits(m, chunk, pad, dev)
        # Σ_i of each example's own loss (its weight cancels alone, as with batch_size=1).
        return sum(
            (response_loss(logits[i : i + 1], b["labels"][i : i + 1]) for i in range(len(chunk))),
            torch.zeros((), device=dev),
        )

    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(_square_per_example(name, module, inputs, sums))
        for name, module in modules.items()
    ]
    try:
        batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
        mean_squared_grads(model, batches, loss_fn, weights)  # drives the passes; hooks collect
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()
    return {k: (s / len(encoded)).cpu() for k, s in sums.items()}


def _square_per_example(
    name: str, module: nn.Module, inputs: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]
) -> Callable[..., None]:
    """A forward hook on ``module`` that adds each example's squared weight gradient to
    ``sums[name.weight]`` when the backward pass reaches the module's output."""
    # Conv1D keeps its weight (in, out): its squared gradient is taken in that orientation.
    transposed = is_conv1d(module)

    def forward_hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs[name] = args[0].detach()

        def backward_hook(grad: torch.Tensor) -> None:
            per_example = torch.einsum("bto,bti->boi", grad.float(), inputs.pop(name).float())
            if transposed:
                per_example = per_example.transpose(1, 2)
            sums[f"{name}.weight"] += per_example.pow(2).sum(0)

        out.register_hook(backward_hook)

    return forward_hook
