"""The ranking model kind: a sentence encoder whose answer is the nearest known output.

A ranking task's **candidates** are its distinct train outputs. The prompt (by default
``{input} [SEP] {instruction}``, ``Ranking.default_prompt``) and every candidate are
embedded by the encoder (mean pooling over the prompt's first segment, the input read in the
context of the instruction, L2-normalised; a one-segment text is pooled whole, as
sentence-transformers' all-MiniLM-L6-v2 does); the answer is the candidate with the highest
cosine similarity. Training is contrastive over the task's candidates: cross-entropy of
``cosine / temperature`` against the reference, both sides through the same LoRA-adapted
encoder; a mixed-task batch is grouped by task, each group ranked against its own task's
candidates. A task with more distinct outputs than ``max_candidates`` is free text, which
this kind refuses (with the reason) rather than scores.

Its parts: the candidates (``candidates.py``), the encoder and cosine ranking
(``encoder.py``), the contrastive loss (``objective.py``) and its Fisher (``fisher.py``),
scoring (``scoring.py``) and the ``onnx-ranking`` bundle (``export.py``).
"""

from __future__ import annotations

from aftertune.learners.kinds.ranking.kind import Ranking

__all__ = ["Ranking"]
