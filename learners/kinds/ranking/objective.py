"""The ranking kind's training loss: contrastive over each task's candidate answers.

Cross-entropy of ``cosine / temperature`` against the reference's anchor, the prompt through
the LoRA-adapted encoder; a mixed-task batch is grouped by task, each group ranked against
its own task's candidates. A candidate's anchor is the one scoring and the bundle answer with
(``encoder.anchors``): its class prototype, the mean embedding of its exemplar prompts, taken
without gradient and rebuilt by the model being trained once per pass over as many examples
of the task as it has exemplars (once an epoch for a task of a few hundred records). So
training pulls each prompt towards its own class's mean and away from the others, the rule it
is answered by. A task whose candidates carry no exemplars is ranked against its answer texts,
through the same encoder, with gradient on both sides. The prototypes are not checkpointed: a
resumed run rebuilds them from the model it resumes with, so it is close to, not bit-identical
with, a run that was never interrupted.

A record rated down (a user said the served answer is wrong for that input) is a hard
negative: its loss is ``-log(1 - p(rejected))``, which pushes the rejected candidate's logit
down for that input without naming a right one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aftertune.learners.data import Encoded, ExampleLike, TruncationCount
from aftertune.learners.errors import LearnerError
from aftertune.learners.kinds.ranking.candidates import (
    AnswerSet,
    Candidates,
    exemplars_of,
    save_candidates,
    save_exemplars,
)
from aftertune.learners.kinds.ranking.encoder import (
    anchors,
    embed_ids,
    pad_token,
    sep_token,
    tokenize,
)
from aftertune.learners.kinds.ranking.fisher import ranking_fisher
from aftertune.learners.objective import ExampleT
from aftertune.learners.specs import RankingSpec
from aftertune.store.prompt import PromptTemplate
from aftertune.store.records import rating_of

REJECTED = 1  # labels[1] of a hard negative: labels[0] is the candidate a user rated down

log = logging.getLogger(__name__)


class RankingObjective:
    """Contrastive loss over each task's candidates; the recipe and the Fisher call it."""

    peft_task_type = "FEATURE_EXTRACTION"

    def __init__(
        self,
        tokenizer: Any,
        candidates: Candidates,
        spec: RankingSpec,
        *,
        max_length: int,
        template: PromptTemplate,
    ) -> None:
        self.tokenizer, self.spec, self.max_length = tokenizer, spec, max_length
        self.template = template
        self.candidates = {task: list(answers) for task, answers in candidates.items()}
        self._index = {t: {a: i for i, a in enumerate(c)} for t, c in self.candidates.items()}
        self._ids = {t: tokenize(tokenizer, c, max_length) for t, c in self.candidates.items()}
        # the answer sets themselves (they may carry exemplars); anchors rebuilt as they age
        self._sets = {
            t: found
            for t, found in candidates.items()
            if isinstance(found, AnswerSet) and any(found.exemplars.values())
        }
        self._anchors: dict[str, torch.Tensor] = {}
        self._seen: dict[str, int] = {}

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[ExampleLike],
        *,
        max_length: int,
        template: PromptTemplate,
        what: str = "examples",
    ) -> tuple[list[Encoded], TruncationCount]:
        """Prompt ids and, as ``labels[0]``, the index of the reference among its candidates.

        Every example must be ``kept`` (its task ranked, its answer a candidate).
        """
        kept = list(examples)
        unknown = [ex for ex in kept if ex.output.strip() not in self._index.get(ex.task, {})]
        if unknown:
            raise LearnerError(
                f"{len(unknown)} {what} have no candidate answer, e.g. task {unknown[0].task!r}"
            )
        prompts = [template.render(ex.instruction, ex.input) for ex in kept]
        full = tokenizer(prompts, truncation=False)["input_ids"] if prompts else []
        ids = tokenize(tokenizer, prompts, max_length) if prompts else []
        encoded = [
            Encoded(
                input_ids=row,
                labels=[self._index[ex.task][ex.output.strip()]]
                + ([REJECTED] if rating_of(getattr(ex, "meta", {})) == "down" else []),
                weight=float(getattr(ex, "weight", 1.0)),
                task=ex.task,
                prompt_truncated=len(whole) > len(row),
                response_truncated=False,
            )
            for ex, row, whole in zip(kept, ids, full, strict=True)
        ]
        cut = sum(e.prompt_truncated for e in encoded)
        return encoded, TruncationCount(len(encoded), cut, 0, cut)

    def loss(
        self, model: Any, chunk: Sequence[Encoded], device: torch.device, amp: bool
    ) -> tuple[torch.Tensor, int]:
        """Weighted mean cross-entropy over the chunk, each task against its candidates."""
        by_task: dict[str, list[Encoded]] = defaultdict(list)
        for e in chunk:
            by_task[e.task].append(e)
        total = torch.zeros((), device=device)
        tokens = 0
        pad, sep = pad_token(self.tokenizer), sep_token(self.tokenizer)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for task, group in sorted(by_task.items()):
                answers = self._anchor_vecs(model, task, len(group), device)
                prompts = embed_ids(model, [e.input_ids for e in group], pad, device, sep)
                logits = prompts @ answers.T / self.spec.temperature
                target = torch.tensor([e.labels[0] for e in group], device=device)
                chosen = F.log_softmax(logits.float(), -1).gather(1, target[:, None])[:, 0]
                rejected = torch.tensor([len(e.labels) > 1 for e in group], device=device)
                # cross-entropy for a reference; -log(1 - p) for a candidate rated down
                unlikely = -torch.log1p(-chosen.exp().clamp(max=1 - 1e-6))
                per = torch.where(rejected, unlikely, -chosen)
                weights = torch.tensor([e.weight for e in group], device=device)
                total = total + (per * weights).sum()
                tokens += sum(len(e.input_ids) for e in group)
        weight_sum = sum(e.weight for e in chunk)
        return total / max(weight_sum, 1e-12), tokens

    def _anchor_vecs(
        self, model: Any, task: str, examples: int, device: torch.device
    ) -> torch.Tensor:
        """The task's anchors for a group of ``examples``: its prototypes (rebuilt once the
        task has trained on as many examples as it has exemplars), else its answer texts."""
        if task not in self._sets:
            return embed_ids(
                model, self._ids[task], pad_token(self.tokenizer), device, sep_token(self.tokenizer)
            )
        exemplars = sum(len(p) for p in self._sets[task].exemplars.values())
        if task not in self._anchors or self._seen[task] >= exemplars:
            self._anchors[task] = anchors(
                model, self.tokenizer, self._sets[task], max_length=self.max_length, device=device
            ).to(device)
            self._seen[task] = 0
        self._seen[task] += examples
        return self._anchors[task]

    def kept(self, examples: Sequence[ExampleT], what: str) -> list[ExampleT]:
        """Examples of ranked tasks whose answer is a candidate; the rest are logged."""
        kept = [ex for ex in examples if ex.output.strip() in self._index.get(ex.task, {})]
        if len(kept) < len(examples):
            skipped = sorted({ex.task for ex in examples} - {ex.task for ex in kept})
            log.warning(
                "%d of %d %s left out: tasks %s are not ranked (more distinct outputs than"
                " ranking.max_candidates=%d)",
                len(examples) - len(kept),
                len(examples),
                what,
                ", ".join(skipped) or "(answers not among the candidates)",
                self.spec.max_candidates,
            )
        return kept

    def save_beside(self, adapter_dir: Path) -> None:
        """The candidates this version ranks among, and their exemplars: its bundle reads them."""
        save_candidates(adapter_dir, self.candidates)
        save_exemplars(adapter_dir, exemplars_of(self._sets))

    def fisher(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        examples: Sequence[ExampleLike],
        target_modules: Sequence[str],
        *,
        max_length: int,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        return ranking_fisher(
            self,
            self.template,
            model,
            tokenizer,
            examples,
            target_modules,
            max_length=max_length,
            device=device,
        )
