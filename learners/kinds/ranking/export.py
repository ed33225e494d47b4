"""A ranking champion → an ``onnx-ranking`` bundle, parity-checked against PyTorch.

The bundle holds the encoder as ONNX (``input_ids``, ``attention_mask`` → normalised
embedding; dynamic batch and length; ``torch.onnx.export``), the tokenizer
(``tokenizer.json``, run by the ``tokenizers`` library), each task's candidate answers
(``candidates.json``) and their anchors (``candidate_embeddings.npy``, float32, computed by the
exported encoder itself: each answer's class prototype, the normalised mean embedding of its
exemplar prompts, or its own text's embedding where it has none; the manifest's ``anchors``
says which), and the manifest. The consumer runtime answers with the nearest anchor whatever
it was built from, so bundles written before prototypes still read. Parity before
publication: on every regression prompt the bundle's embedding is within
``export.embedding_atol`` of PyTorch's and its chosen answer is PyTorch's, the anchors
rebuilt by PyTorch from the same exemplars.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aftertune.learners.base_model import load_base
from aftertune.learners.errors import ExportError
from aftertune.learners.export import ExportResult, ExportSpec
from aftertune.learners.kinds.ranking.candidates import exemplars_of
from aftertune.learners.kinds.ranking.encoder import (
    Embedder,
    anchors,
    pad_rows,
    sep_token,
    tokenize,
)
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import FORMAT_RANKING, write_manifest

log = logging.getLogger(__name__)

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_ranking(
    model_dir: Path,
    staging: Path,
    spec: ExportSpec,
    *,
    max_length: int,
    candidates: Mapping[str, Sequence[str]],
    prompts: Sequence[tuple[str, str]],
    manifest_fields: Mapping[str, Any],
) -> ExportResult:
    """Export the encoder at ``model_dir`` with ``candidates`` into ``staging``; check parity.

    ``prompts`` are (task, prompt) regression pairs. Raises ExportError when the export fails
    or the bundle's embeddings or answers differ from PyTorch's.
    """
    model_dir, staging = Path(model_dir), Path(staging)
    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json: a fast tokenizer is needed")
    t0 = time.monotonic()
    model, tokenizer = load_base(model_dir, device="cpu", dtype=torch.float32)
    _onnx_encoder(model, tokenizer, staging / "model.onnx")
    for name in COPIED:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, staging / name)
    header = {
        "format": FORMAT_RANKING,
        "version": manifest_fields["version"],
        "prompt": {
            "with_input": spec.template.with_input,
            "without_input": spec.template.without_input,
        },
        "max_length": max_length,
        "pad_token_id": int(tokenizer.pad_token_id or 0),
        "tasks": {task: len(answers) for task, answers in sorted(candidates.items())},
        "anchors": "prototypes" if exemplars_of(candidates) else "answer texts",
    }
    _write_candidates(staging, candidates, header)
    seconds = {"export_s": time.monotonic() - t0}
    t0 = time.monotonic()
    parity = check_ranking_parity(
        model, tokenizer, Bundle(staging, {**header, "files": {}}), spec, prompts, candidates
    )
    seconds["parity_s"] = time.monotonic() - t0
    manifest = write_manifest(
        staging,
        {
            **manifest_fields,
            **header,
            "precision": "fp32",
            "target": "cpu",
            "parity": parity,
            "export": {"method": "torch.onnx", "seconds": round(seconds["export_s"], 3)},
        },
    )
    return ExportResult(staging, manifest, seconds)


def _onnx_encoder(model: Any, tokenizer: Any, path: Path) -> None:
    ids = torch.tensor(tokenize(tokenizer, ["an example prompt", "another"], 16)[0:1] * 2)
    try:
        torch.onnx.export(
            Embedder(model, sep_token(tokenizer)).eval(),
            (ids, torch.ones_like(ids)),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "embedding": {0: "batch"},
            },
            opset_version=17,
        )
    except Exception as exc:  # the exporter raises many types; the reason is what matters
        raise ExportError(f"torch.onnx export failed: {type(exc).__name__}: {exc}") from exc


def _write_candidates(
    staging: Path, candidates: Mapping[str, Sequence[str]], header: Mapping[str, Any]
) -> None:
    """candidates.json and their anchors, computed by the exported encoder itself."""
    staged = Bundle(staging, {**header, "files": {}, "candidates": None})
    tasks, rows, start = {}, [], 0
    for task, answers in sorted(candidates.items()):
        tasks[task] = {"answers": list(answers), "start": start}
        rows.append(_anchors(staged, answers))
        start += len(answers)
    (staging / "candidates.json").write_text(
        json.dumps({"tasks": tasks}, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    dim = rows[0].shape[1] if rows else 0
    matrix = np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    np.save(staging / "candidate_embeddings.npy", matrix.astype(np.float32), allow_pickle=False)


def _anchors(staged: Bundle, answers: Sequence[str]) -> Any:
    """Each answer's anchor by the bundle's encoder, as ``encoder.anchors`` builds it."""
    exemplars = getattr(answers, "exemplars", {})
    rows = []
    for answer in answers:
        vecs = staged.embed(list(exemplars.get(answer) or [answer]))
        mean = vecs.mean(0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return np.stack(rows).astype(np.float32)


def check_ranking_parity(
    model: Any,
    tokenizer: Any,
    bundle: Bundle,
    spec: ExportSpec,
    prompts: Sequence[tuple[str, str]],
    candidates: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Bundle vs PyTorch on the regression prompts: embeddings and chosen answers (PyTorch
    anchors built from ``candidates``' exemplars, as training and scoring build them)."""
    if not prompts:
        raise ExportError("no parity prompts: the champion has no held-out example to compare on")
    pairs = [(t, p) for t, p in prompts if t in bundle.candidates][: spec.parity_prompts]
    if not pairs:
        raise ExportError("no parity prompt belongs to a ranked task")
    texts = [p for _, p in pairs]
    rows = tokenize(tokenizer, texts, bundle.max_length)
    if [bundle.encode(t) for t in texts] != rows:
        raise ExportError("parity: the bundle's tokenizer does not reproduce the training ids")
    got = bundle.embed(texts)
    with torch.no_grad():
        embedder = Embedder(model, sep_token(tokenizer)).eval()
        want = embedder(*pad_rows(rows, bundle.pad_token_id)).numpy()
    diff = float(np.abs(got - want).max())
    if diff > spec.embedding_atol:
        raise ExportError(
            f"parity: embeddings differ by up to {diff:.2e} > {spec.embedding_atol:g} from PyTorch"
        )
    same, first_diff = _compare_answers(model, tokenizer, bundle, candidates, pairs, got, want)
    if same < len(pairs):
        raise ExportError(
            f"parity: {len(pairs) - same}/{len(pairs)} answers differ from PyTorch, "
            f"first {first_diff}"
        )
    return {"prompts": len(pairs), "identical": same, "embedding_max_abs_diff": diff}


def _compare_answers(
    model: Any,
    tokenizer: Any,
    bundle: Bundle,
    candidates: Mapping[str, Sequence[str]],
    pairs: Sequence[tuple[str, str]],
    got: Any,
    want: Any,
) -> tuple[int, str | None]:
    """How many prompts get the same answer from the bundle and PyTorch; the first that does not."""
    same, first_diff = 0, None
    answer_vecs: dict[str, Any] = {}
    for (task, text), onnx_vec, torch_vec in zip(pairs, got, want, strict=True):
        answers = bundle.candidates[task]
        if task not in answer_vecs:
            built = anchors(model, tokenizer, candidates[task], max_length=bundle.max_length)
            answer_vecs[task] = built.numpy()
        torch_pick = answers[int((answer_vecs[task] @ torch_vec).argmax())]
        onnx_pick = bundle.pick(task, onnx_vec)
        same += torch_pick == onnx_pick
        if torch_pick != onnx_pick and first_diff is None:
            first_diff = f"{text[:60]!r}: torch {torch_pick!r} vs onnx {onnx_pick!r}"
    return same, first_diff
