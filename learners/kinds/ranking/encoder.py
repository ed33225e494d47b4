"""The encoder side of the ranking kind: sentence embeddings and cosine ranking.

Mean pooling over the attention mask, L2-normalised (as sentence-transformers'
all-MiniLM-L6-v2 does); ``rank`` gives every prompt's cosine to every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


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


def pad_token(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id or 0)


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
    pad = pad_token(tokenizer)
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
