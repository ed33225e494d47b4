"""The ``onnx-ranking`` runtime: the answer is the task's candidate nearest the prompt.

``model.onnx`` maps (input_ids, attention_mask) to a normalised embedding;
``candidates.json`` holds each task's answers and where their rows start in
``candidate_embeddings.npy`` (the answers embedded by that same encoder at export).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aftertune.store.consumer.runtime import Prompt, onnx_session
from aftertune.store.errors import BundleError


class RankingRuntime:
    """An ``onnx-ranking`` bundle: embeds prompts and picks each task's nearest candidate."""

    def __init__(self, path: Path, manifest: Mapping[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.version = manifest.get("version")
        self.max_length = int(manifest.get("max_length") or 512)
        self.pad_token_id = int(manifest.get("pad_token_id") or 0)
        self.session = onnx_session(path / "model.onnx")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.candidates: dict[str, list[str]] = {}
        self._vectors: dict[str, Any] = {}
        if "candidates" not in manifest:  # absent only for the exporter, before it wrote them
            self._load_candidates(path)

    def _load_candidates(self, path: Path) -> None:
        import numpy as np

        try:
            tasks = json.loads((path / "candidates.json").read_text(encoding="utf-8"))["tasks"]
            matrix = np.load(path / "candidate_embeddings.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{path}: unreadable candidates: {exc}") from exc
        for task, entry in tasks.items():
            answers, start = [str(a) for a in entry["answers"]], int(entry["start"])
            self.candidates[task] = answers
            self._vectors[task] = matrix[start : start + len(answers)]
            if self._vectors[task].shape[0] != len(answers):
                raise BundleError(f"{path}: task {task!r} has fewer embeddings than answers")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)  # an encoder's ids carry its special tokens

    def answer(self, prompts: Sequence[Prompt], batch_size: int) -> list[str]:
        """Embeds the prompts ``batch_size`` per ONNX call, grouped by length."""
        for task, _ in prompts:
            self._known(task)
        vectors = self.embed([p for _, p in prompts], batch_size) if prompts else []
        return [self.pick(str(t), v) for (t, _), v in zip(prompts, vectors, strict=True)]

    def _known(self, task: str | None) -> None:
        if task is None or task not in self.candidates:
            known = ", ".join(sorted(self.candidates)) or "none"
            what = "a task" if task is None else f"task {task!r}"
            raise BundleError(
                f"bundle v{self.version} ranks answers per task and needs {what} it knows: {known}"
            )

    def embed(self, texts: Sequence[str], batch_size: int) -> Any:
        """Runs ``batch_size`` texts per ONNX call, grouped by length (less padding)."""
        import numpy as np

        rows = [self.encode(t) for t in texts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: Any = None
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start : start + max(1, batch_size)]
            width = max(len(rows[i]) for i in idx)
            ids = np.full((len(idx), width), self.pad_token_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i])], mask[j, : len(rows[i])] = rows[i], 1
            got = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
            if out is None:
                out = np.zeros((len(rows), got.shape[1]), dtype=got.dtype)
            out[idx] = got
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def pick(self, task: str, vector: Any) -> str:
        """Cosine similarity: prompt and candidates are both normalised."""
        self._known(task)
        return self.candidates[task][int((self._vectors[task] @ vector).argmax())]
