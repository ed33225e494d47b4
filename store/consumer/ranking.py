"""The ``onnx-ranking`` runtime: the answer is the task's candidate nearest the prompt.

``model.onnx`` maps (input_ids, attention_mask) to a normalised embedding;
``candidates.json`` holds each task's answers and where their rows start in
``candidate_embeddings.npy`` (the answers embedded by that same encoder at export).

Both are checked completely at open, so a damaged or hostile bundle (whose manifest was
re-sealed to match) is refused with the file and field named, never answered from: types
and shapes, rows in range, finite values, the embeddings' width against the model's, and
the ``.npy`` header against the file's size before anything is allocated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aftertune.store.consumer.runtime import CHARS_PER_TOKEN, Prompt, onnx_session
from aftertune.store.errors import BundleError

CANDIDATES = "candidates.json"
EMBEDDINGS = "candidate_embeddings.npy"


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
        tasks = read_tasks(path / CANDIDATES)
        matrix = read_matrix(path / EMBEDDINGS)
        width = self._model_width(path)
        if matrix.shape[0] and matrix.shape[1] != width:  # no rows: a bundle with no task
            raise BundleError(
                f"{path / EMBEDDINGS}: rows of width {matrix.shape[1]}, but model.onnx embeds "
                f"into {width}: the embeddings do not belong to this model"
            )
        for task, (answers, start) in tasks.items():
            if start + len(answers) > matrix.shape[0]:
                raise BundleError(
                    f"{path / CANDIDATES}: task {task!r} needs rows {start} to "
                    f"{start + len(answers) - 1} of {EMBEDDINGS}, which has {matrix.shape[0]}"
                )
            self.candidates[task] = answers
            self._vectors[task] = matrix[start : start + len(answers)]

    def _model_width(self, path: Path) -> int:
        """The width of the model's embeddings, measured on one short text."""
        try:
            probe = self.embed(["width"], 1)
        except Exception as exc:  # ONNX Runtime raises its own types; the reason matters
            raise BundleError(f"{path / 'model.onnx'}: does not embed a text: {exc}") from None
        if probe.ndim != 2 or not _finite(probe):
            raise BundleError(
                f"{path / 'model.onnx'}: embeds a text as shape {probe.shape}, not one finite row"
            )
        return int(probe.shape[1])

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` cut to ``max_length`` tokens; the text is cut first to what those
        tokens can cover, so a huge input is never tokenized whole."""
        cut = text[: self.max_length * CHARS_PER_TOKEN]
        return list(self.tokenizer.encode(cut).ids)  # an encoder's ids carry its special tokens

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


def read_tasks(file: Path) -> dict[str, tuple[list[str], int]]:
    """``candidates.json``'s tasks: each task's answers (strings, at least one) and the row
    its embeddings start at (a non-negative integer). BundleError naming the field."""
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{file}: unreadable: {str(exc)[:200]}") from None
    tasks = found.get("tasks") if isinstance(found, dict) else None
    if not isinstance(tasks, dict):
        raise BundleError(f"{file}: 'tasks' must be an object mapping each task to its answers")
    out: dict[str, tuple[list[str], int]] = {}
    for task, entry in tasks.items():
        field = f"{file}: tasks[{task!r}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{field} must be an object with 'answers' and 'start'")
        answers, start = entry.get("answers"), entry.get("start")
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) for a in answers)
        ):
            raise BundleError(
                f"{field}.answers must be a non-empty list of strings, got {answers!r:.60}"
            )
        if type(start) is not int or start < 0:
            raise BundleError(f"{field}.start must be a non-negative integer, got {start!r:.40}")
        out[task] = (answers, start)
    return out


def read_matrix(file: Path) -> Any:
    """``candidate_embeddings.npy``: a 2-D float matrix of finite values.

    The header is read first and its shape checked against the file's size, so a header
    that claims a huge shape is refused before anything is allocated for it."""
    import numpy as np
    from numpy.lib import format as npy

    try:
        with open(file, "rb") as fh:
            version = npy.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(
                    f".npy format version {version} is not one numpy writes for floats"
                )
            read_header = (
                npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            )
            shape, _, dtype = read_header(fh)
            data_bytes = file.stat().st_size - fh.tell()
    except (OSError, ValueError) as exc:
        raise BundleError(f"{file}: not a readable .npy file: {str(exc)[:200]}") from None
    if dtype.kind != "f":
        raise BundleError(f"{file}: holds {dtype}, not floating-point embeddings")
    if len(shape) != 2:
        raise BundleError(f"{file}: must be a 2-D matrix (rows x width), got shape {shape}")
    if math.prod(shape) * dtype.itemsize != data_bytes:
        raise BundleError(
            f"{file}: its header claims shape {shape} of {dtype} ({math.prod(shape) * dtype.itemsize} "
            f"bytes), the file holds {data_bytes}"
        )
    try:
        matrix = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{file}: not a readable .npy file: {str(exc)[:200]}") from None
    if not _finite(matrix):
        raise BundleError(f"{file}: holds NaN or infinite values")
    return matrix


def _finite(array: Any) -> bool:
    import numpy as np

    return bool(np.isfinite(array).all())
