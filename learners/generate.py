"""Greedy decoding: the one way the learners ask a PyTorch model what it answers.

Evaluation scores these answers, the embedded base's build report counts them right or
wrong, and the export parity check compares them token by token with the ONNX bundle's, so
all three must decode the same way: left-padded batches, no sampling, one beam, each row cut
before its first EOS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from aftertune.learners.data import left_pad, pad_id


class CausalLM(Protocol):
    """What greedy decoding needs of a model: Hugging Face ``generate`` and its parameters."""

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


@torch.no_grad()
def greedy_continuations(
    model: CausalLM,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> list[list[int]]:
    """The greedy new token ids of each prompt, in input order, cut before EOS.

    Pad and EOS ids come from ``tokenizer``. ``batch_size`` None decodes all prompts as one
    batch; 1 decodes each alone, unpadded (what the parity check compares with an ONNX
    runtime that decodes one prompt at a time). ``device`` defaults to the model's.
    """
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    if device is None:
        device = next(model.parameters()).device
    size = batch_size or max(len(prompt_ids), 1)
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), size):
        ids, mask, _ = left_pad(prompt_ids[start : start + size], pad, device)
        # No position ids: generate derives them from the attention mask, the same way.
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in generated[:, ids.shape[1] :].tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
    return out


def greedy_answers(
    model: CausalLM,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of text ``prompts``, decoded without special tokens."""
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    continuations = greedy_continuations(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in continuations]
