"""The ranking model kind: a sentence encoder whose answer is the nearest known output.

A ranking task's **candidates** are its distinct train outputs. The prompt (instruction +
input, rendered by the same template as the generative kind) and every candidate are
embedded by the encoder (mean pooling over the attention mask, L2-normalised, as
sentence-transformers' all-MiniLM-L6-v2 does); the answer is the candidate with the highest
cosine similarity. Training is contrastive over the task's candidates: cross-entropy of
``cosine / temperature`` against the reference, both sides through the same LoRA-adapted
encoder; a mixed-task batch is grouped by task, each group ranked against its own task's
candidates. A task with more distinct outputs than ``max_candidates`` is free text, which
this kind refuses (with the reason) rather than scores.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aftertune.learners.data import Encoded, ExampleLike, TruncationCount
from aftertune.learners.errors import LearnerError
from aftertune.learners.objectives import ExampleT
from aftertune.store.prompt import PromptTemplate

log = logging.getLogger(__name__)

CANDIDATES_FILE = "candidates.json"  # in each ranking adapter dir: its version's candidates
Candidates = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class RankingSpec:
    """How the ranking kind scores answers. No defaults: the settings' ``[ranking]`` are."""

    temperature: float  # cosine similarities are divided by it before the softmax
    max_candidates: int  # more distinct outputs than this: a free-text task, refused

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"ranking temperature must be > 0, got {self.temperature}")
        if self.max_candidates < 2:
            raise ValueError(f"ranking max_candidates must be >= 2, got {self.max_candidates}")


# --- candidates --------------------------------------------------------------------------------


def candidates_of(outputs: Sequence[str], max_candidates: int) -> list[str] | None:
    """A task's candidates (distinct outputs, sorted), or None when it has too many to rank."""
    distinct = sorted({o.strip() for o in outputs if o.strip()})
    return distinct if 0 < len(distinct) <= max_candidates else None


def refusal(task: str, outputs: Sequence[str], max_candidates: int) -> str:
    """Why ``task`` is not ranked: what a report and ``aftertune eval`` say instead of a score."""
    distinct = len({o.strip() for o in outputs if o.strip()})
    return (
        f"task {task!r} has {distinct} distinct outputs, more than ranking.max_candidates="
        f"{max_candidates}: it is free text, which a ranking model cannot answer; use a "
        "generative base model for it, or raise ranking.max_candidates"
    )


def save_candidates(adapter_dir: Path, candidates: Candidates) -> None:
    """Record the candidates a ranking version was trained with, beside its adapter."""
    data = {task: list(answers) for task, answers in sorted(candidates.items())}
    (Path(adapter_dir) / CANDIDATES_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=1))


def load_candidates(adapter_dir: Path) -> dict[str, list[str]]:
    path = Path(adapter_dir) / CANDIDATES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LearnerError(f"cannot read the candidates of {adapter_dir}: {exc}") from exc
    return {str(task): [str(a) for a in answers] for task, answers in data.items()}


# --- the encoder -------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under the attention mask, L2-normalised (sentence embedding)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(pooled.float(), dim=-1)


class Embedder(torch.nn.Module):
    """``input_ids``, ``attention_mask`` → normalised embedding: what the bundle exports."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return mean_pool(hidden, attention_mask)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens, cut at ``max_length`` (the bundle's rule)."""
    return [
        list(ids)
        for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ]


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def embed_ids(
    model: Any, rows: Sequence[Sequence[int]], pad: int, device: torch.device | str
) -> torch.Tensor:
    ids, mask = pad_rows(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    return mean_pool(model(input_ids=ids, attention_mask=mask)[0], mask)


def _pad(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id or 0)


# --- training objective ------------------------------------------------------------------------


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
                labels=[self._index[ex.task][ex.output.strip()]],
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
        pad = _pad(self.tokenizer)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for task, group in sorted(by_task.items()):
                prompts = embed_ids(model, [e.input_ids for e in group], pad, device)
                answers = embed_ids(model, self._ids[task], pad, device)
                logits = prompts @ answers.T / self.spec.temperature
                target = torch.tensor([e.labels[0] for e in group], device=device)
                per = F.cross_entropy(logits.float(), target, reduction="none")
                weights = torch.tensor([e.weight for e in group], device=device)
                total = total + (per * weights).sum()
                tokens += sum(len(e.input_ids) for e in group)
        weight_sum = sum(e.weight for e in chunk)
        return total / max(weight_sum, 1e-12), tokens

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
        """The candidates this version ranks among: its bundle and evaluation read them."""
        save_candidates(adapter_dir, self.candidates)

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
        return _ranking_fisher(
            self, model, tokenizer, examples, target_modules, max_length=max_length, device=device
        )


# --- scoring -----------------------------------------------------------------------------------


@torch.no_grad()
def rank(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Cosine similarity of every prompt to every candidate, [prompts, candidates] on CPU."""
    pad = _pad(tokenizer)
    was_training = model.training
    model.eval()
    try:
        answer_vecs = embed_ids(model, tokenize(tokenizer, candidates, max_length), pad, device)
        rows = tokenize(tokenizer, prompts, max_length)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        sims = torch.zeros(len(rows), len(candidates))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            vecs = embed_ids(model, [rows[i] for i in idx], pad, device)
            sims[idx] = (vecs @ answer_vecs.T).float().cpu()
    finally:
        model.train(was_training)
    return sims


def ranking_nll(sims: torch.Tensor, targets: Sequence[int], temperature: float) -> float:
    """Summed cross-entropy (nats) of the references under softmax(cosine / temperature)."""
    if not len(targets):
        return 0.0
    logits = sims / temperature
    return float(F.cross_entropy(logits, torch.tensor(list(targets)), reduction="sum"))


def chance(candidates: Sequence[str]) -> float:
    """Accuracy of a uniform guess among the candidates."""
    return 1.0 / len(candidates) if candidates else 0.0


def nats_uniform(candidates: Sequence[str]) -> float:
    return math.log(len(candidates)) if candidates else 0.0


def _ranking_fisher(
    objective: RankingObjective,
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[ExampleLike],
    target_modules: Sequence[str],
    *,
    max_length: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """avalanche's importance with one example per batch: each example's squared gradient."""
    from aftertune.learners.ewc import mean_squared_grads, target_weights

    encoded, _ = objective.encode(
        tokenizer, examples, max_length=max_length, template=objective.template, what="Fisher"
    )
    if not encoded:
        raise ValueError("cannot estimate a Fisher from zero ranked examples")

    def loss_fn(m: torch.nn.Module, chunk: Any) -> torch.Tensor:
        return objective.loss(m, chunk, device, device.type == "cuda")[0]

    batches = [[e] for e in encoded]
    return mean_squared_grads(model, batches, loss_fn, target_weights(model, target_modules))
