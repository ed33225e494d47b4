"""The generative kind's training loss: next-token cross-entropy on the response tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aftertune.learners.data import (
    Encoded,
    ExampleLike,
    TruncationCount,
    collate,
    encode_examples,
    pad_id,
    response_loss,
)
from aftertune.learners.kinds.generative.fisher import estimate_fisher_per_sample
from aftertune.learners.objective import ExampleT
from aftertune.store.prompt import PromptTemplate
from aftertune.store.records import rating_of


class ResponseObjective:
    """The generative kind: next-token cross-entropy on the response tokens only."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, tokenizer: Any) -> None:
        self.pad = pad_id(tokenizer)

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[ExampleLike],
        *,
        max_length: int,
        template: PromptTemplate,
        what: str = "examples",
    ) -> tuple[list[Encoded], TruncationCount]:
        return encode_examples(
            tokenizer, examples, max_length=max_length, template=template, what=what
        )

    def loss(
        self, model: Any, chunk: Sequence[Encoded], device: torch.device, amp: bool
    ) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(device) for k, v in collate(chunk, self.pad).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = response_loss(logits.logits, batch["labels"], batch["weights"])
        return loss, int(batch["attention_mask"].sum())

    def fisher(
        self,
        model: nn.Module,
        tokenizer: Any,
        examples: Sequence[ExampleLike],
        target_modules: Sequence[str],
        *,
        max_length: int,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        return estimate_fisher_per_sample(
            model, tokenizer, examples, target_modules, max_length=max_length, device=device
        )

    def save_beside(self, adapter_dir: Path) -> None:
        """Nothing: a generative version is its adapter."""

    def kept(self, examples: Sequence[ExampleT], what: str) -> list[ExampleT]:
        """All but answers rated down: a causal LM learns any answer, and a thumbs-down
        names a wrong one without the right one, which this loss has no term for (the
        record stays stored with its rating)."""
        return [ex for ex in examples if rating_of(getattr(ex, "meta", {})) != "down"]
