"""What the recipe and the Fisher ask of a model kind's training objective.

An objective turns examples into ``Encoded`` rows and a chunk of rows into a loss. The
generative kind's is next-token cross-entropy on the response
(``kinds/generative/objective.py``); the ranking kind's is contrastive over a task's
candidate answers (``kinds/ranking/objective.py``). The recipe, replay and EWC see only this
interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from aftertune.learners.data import Encoded, ExampleLike, TruncationCount
from aftertune.store.prompt import PromptTemplate

ExampleT = TypeVar("ExampleT", bound=ExampleLike)


class Objective(Protocol):
    """A model kind's training loss. ``peft_task_type`` is what peft calls the model's task."""

    peft_task_type: str

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[ExampleLike],
        *,
        max_length: int,
        template: PromptTemplate,
        what: str = "examples",
    ) -> tuple[list[Encoded], TruncationCount]: ...

    def loss(
        self, model: Any, chunk: Sequence[Encoded], device: torch.device, amp: bool
    ) -> tuple[torch.Tensor, int]:
        """The chunk's weighted mean loss and the tokens it went through."""
        ...

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
        """The diagonal empirical Fisher of this loss over the targeted weights."""
        ...

    def save_beside(self, adapter_dir: Path) -> None:
        """Write what a version of this kind needs besides its adapter (into its dir)."""
        ...

    def kept(self, examples: Sequence[ExampleT], what: str) -> list[ExampleT]:
        """The examples this objective can learn from (the others logged, with why)."""
        ...
