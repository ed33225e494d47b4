"""The encoder side of the ranking kind: sentence embeddings and cosine ranking.

Mean pooling over the prompt's first segment (up to its first ``[SEP]``: the input of
``{input} [SEP] {instruction}``; a one-segment text is pooled whole, as
sentence-transformers' all-MiniLM-L6-v2 does), L2-normalised; ``anchors`` gives each
candidate's point in that space (its class prototype, see ``candidates.py``) and ``rank``
every prompt's cosine to every anchor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def first_segment(input_ids: torch.Tensor, mask: torch.Tensor, sep: int | None) -> torch.Tensor:
    """``mask`` cut after the first separator token (``sep``, the tokenizer's ``[SEP]``): the
    tokens the embedding is pooled over. A prompt with one segment (a single ``[SEP]``, at
    its end) keeps its whole mask; ``{input} [SEP] {instruction}`` is pooled over its input
    alone, read in the context of the instruction."""
    if sep is None:
        return mask
    seps = (input_ids == sep).to(mask.dtype) * mask
    before = torch.cumsum(seps, dim=1) - seps  # separators strictly before each token
    return mask * (before == 0).to(mask.dtype)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under ``mask``, L2-normalised (sentence embedding)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(pooled.float(), dim=-1)


class Embedder(torch.nn.Module):
    """``input_ids``, ``attention_mask`` → normalised embedding: what the bundle exports."""

    def __init__(self, encoder: Any, sep: int | None) -> None:
        super().__init__()
        self.encoder, self.sep = encoder, sep

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return mean_pool(hidden, first_segment(input_ids, attention_mask, self.sep))


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
    model: Any,
    rows: Sequence[Sequence[int]],
    pad: int,
    device: torch.device | str,
    sep: int | None = None,
) -> torch.Tensor:
    ids, mask = pad_rows(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    return mean_pool(model(input_ids=ids, attention_mask=mask)[0], first_segment(ids, mask, sep))


def pad_token(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id or 0)


def sep_token(tokenizer: Any) -> int | None:
    """The id that ends a segment (``[SEP]``), or None for a tokenizer without one."""
    found = getattr(tokenizer, "sep_token_id", None)
    return None if found is None else int(found)


# --- scoring -----------------------------------------------------------------------------------


@torch.no_grad()
def embed_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalised embeddings of ``texts`` in eval mode, [texts, width] float on CPU; batches
    grouped by length (less padding), rows in the caller's order."""
    pad, sep = pad_token(tokenizer), sep_token(tokenizer)
    rows = tokenize(tokenizer, texts, max_length)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    was_training = model.training
    model.eval()
    try:
        out: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            vecs = embed_ids(model, [rows[i] for i in idx], pad, device, sep).float().cpu()
            if out is None:
                out = torch.zeros(len(rows), vecs.shape[1])
            out[idx] = vecs
    finally:
        model.train(was_training)
    return out if out is not None else torch.zeros(0, 0)


def anchors(
    model: Any,
    tokenizer: Any,
    candidates: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Each candidate's anchor, [candidates, width] on CPU: the normalised mean embedding of
    its exemplar prompts (its class prototype) when ``candidates`` carries exemplars
    (``candidates.AnswerSet``), else the embedding of the answer text itself."""
    exemplars = getattr(candidates, "exemplars", {})
    texts = [p for c in candidates for p in exemplars.get(c, ())]
    bare = [c for c in candidates if not exemplars.get(c)]
    vecs = embed_texts(
        model, tokenizer, texts + bare, max_length=max_length, batch_size=batch_size, device=device
    )
    rows, start, label = [], 0, len(texts)
    for c in candidates:
        n = len(exemplars.get(c, ()))
        if n:
            rows.append(F.normalize(vecs[start : start + n].mean(0), dim=-1))
            start += n
        else:
            rows.append(vecs[label])
            label += 1
    return torch.stack(rows)


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
    """Cosine similarity of every prompt to every candidate's anchor, [prompts, candidates]
    on CPU."""
    if not prompts:
        return torch.zeros(0, len(candidates))
    opts: dict[str, Any] = {"max_length": max_length, "batch_size": batch_size, "device": device}
    answer_vecs = anchors(model, tokenizer, candidates, **opts)
    return embed_texts(model, tokenizer, prompts, **opts) @ answer_vecs.T


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
