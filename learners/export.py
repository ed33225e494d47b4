"""Champion (merged Hugging Face checkpoint) → ONNX bundle, parity-checked against PyTorch.

Primary path: onnxruntime-genai's model builder (KV cache, ``genai_config.json``; fp32,
int8 or int4; CPU or CUDA), run as a subprocess so its memory and failures stay its own.
Fallback when the builder fails or does not know the architecture (reason logged and kept
in the manifest): ``torch.onnx.export(dynamo=True)`` of input_ids + attention_mask → logits
with dynamic batch and sequence axes.

Everything happens in a staging directory the caller owns; nothing here publishes.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aftertune.learners.errors import ExportError
from aftertune.learners.progress import Progress
from aftertune.store.bundle import FORMAT_GENAI, FORMAT_LOGITS, write_manifest
from aftertune.store.consumer import Bundle
from aftertune.store.prompt import PromptTemplate

log = logging.getLogger(__name__)

METHODS = ("auto", "genai", "torch")
PRECISIONS = ("fp32", "int8", "int4")
TARGETS = ("cpu", "cuda")
# Copied next to the ONNX files so a consumer has the tokenizer and the generation settings.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
BUILDER_TIMEOUT_S = 1800
# int4 with the builder's defaults (RTN, block 32) agreed with fp32 on 88 % of greedy tokens
# of the tiny base; k-quant with the last MatMul and sensitive layers in int8 on 96-99 %,
# at 0.25x the fp32 size (bench/runtime.py, docs/benchmarks.md).
EXTRA_OPTIONS = {"int4": ["algo_config=k_quant_mixed"]}


@dataclass(frozen=True)
class ExportSpec:
    """How a champion becomes a bundle. No defaults: the settings' ``[export]`` and
    ``[prompt]`` are the one source of them."""

    method: str  # auto: genai builder, torch fallback; or force one
    precision: str
    target: str
    parity_prompts: int
    parity_max_new_tokens: int
    min_token_agreement: float  # int8/int4 only; fp32 must agree on every token
    logits_atol: float  # fallback fp32: max |logit difference| on the parity prompts
    embedding_atol: float  # ranking bundles: max |embedding difference| on the parity prompts
    template: PromptTemplate  # written to the manifest: consumers render prompts with it

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"export method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.method == "torch" and self.precision != "fp32":
            raise ValueError("the torch.onnx fallback exports fp32 only")
        if not 0 <= self.min_token_agreement <= 1:
            raise ValueError("min_token_agreement must be within [0, 1]")


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def export_bundle(
    model_dir: Path,
    staging: Path,
    spec: ExportSpec,
    prompts: Sequence[str],
    manifest_fields: Mapping[str, Any],
) -> ExportResult:
    """Export ``model_dir`` into the empty ``staging`` dir, check parity, write the manifest.

    Raises ExportError (the reason a candidate is rejected) when no exporter succeeds or
    the bundle's answers differ from PyTorch's beyond what ``spec`` allows.
    """
    model_dir, staging = Path(model_dir), Path(staging)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    fmt, fallback_reason = _export_onnx(model_dir, staging, spec)
    seconds["export_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    config = _read_json(model_dir / "config.json")
    header = {
        "format": fmt,
        "version": manifest_fields["version"],
        "prompt": {
            "with_input": spec.template.with_input,
            "without_input": spec.template.without_input,
        },
        "eos_token_id": config.get("eos_token_id"),
        "context_length": config.get("max_position_embeddings"),
    }
    # A manifest without file hashes lets the consumer runtime load the staged model as-is.
    staged = Bundle(staging, {**header, "files": {}})
    parity = check_parity(model_dir, staged, spec, prompts)
    seconds["parity_s"] = time.monotonic() - t0
    manifest = write_manifest(
        staging,
        {
            **manifest_fields,
            **header,
            "precision": spec.precision,
            "target": spec.target,
            "parity": parity,
            "export": {
                "method": "genai-builder" if fmt == FORMAT_GENAI else "torch.onnx(dynamo)",
                "fallback_reason": fallback_reason,
                "seconds": round(seconds["export_s"], 3),
            },
        },
    )
    return ExportResult(staging, manifest, seconds)


def _export_onnx(model_dir: Path, staging: Path, spec: ExportSpec) -> tuple[str, str | None]:
    """ONNX files and the checkpoint's tokenizer/config files into ``staging``.

    Returns the bundle format and, when the builder failed and torch.onnx stood in, why.
    """
    fallback_reason = None
    fmt = FORMAT_GENAI
    if spec.method in ("auto", "genai"):
        try:
            _run_builder(model_dir, staging, spec)
        except ExportError as exc:
            if spec.method == "genai":
                raise
            fallback_reason = str(exc)
            log.warning("genai builder failed, falling back to torch.onnx: %s", exc)
            _empty(staging)
            fmt = FORMAT_LOGITS
    else:
        fmt = FORMAT_LOGITS
    if fmt == FORMAT_LOGITS:
        _torch_export(model_dir, staging)
    for name in CHECKPOINT_FILES:
        if (model_dir / name).is_file() and not (staging / name).exists():
            shutil.copy2(model_dir / name, staging / name)
    return fmt, fallback_reason


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _run_builder(model_dir: Path, out: Path, spec: ExportSpec) -> None:
    options = {
        "-i": str(model_dir),
        "-o": str(out),
        "-p": spec.precision,
        "-e": spec.target,
        "-c": str(out / ".builder-cache"),
    }
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    for flag, value in options.items():
        cmd += [flag, value]
    if EXTRA_OPTIONS.get(spec.precision):
        cmd += ["--extra_options", *EXTRA_OPTIONS[spec.precision]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ExportError(f"genai builder did not finish in {BUILDER_TIMEOUT_S} s") from None
    shutil.rmtree(out / ".builder-cache", ignore_errors=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"genai builder exited {done.returncode}: {tail[0][:300]}")


def _torch_export(model_dir: Path, out: Path) -> None:
    import torch

    from aftertune.learners.base_model import load_base

    model, tokenizer = load_base(model_dir, device="cpu", dtype=torch.float32)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits

    ids = torch.tensor([tokenizer("Instruction: x\nResponse: ")["input_ids"]] * 2)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    try:
        torch.onnx.export(
            LogitsOnly(model).eval(),
            (ids, torch.ones_like(ids)),
            str(out / "model.onnx"),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            external_data=False,
            optimize=True,
        )
    except Exception as exc:  # the exporter raises many types; the reason is what matters
        raise ExportError(f"torch.onnx export failed: {type(exc).__name__}: {exc}") from exc


def reference_continuations(
    model_dir: Path, prompt_ids: Sequence[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], Any, Any]:
    """PyTorch ``generate`` greedy tokens per prompt (EOS cut), plus the model and tokenizer."""
    import torch

    from aftertune.learners.base_model import load_base
    from aftertune.learners.generate import greedy_continuations

    model, tokenizer = load_base(model_dir, device="cpu", dtype=torch.float32)
    # One prompt at a time, unpadded, as the bundle decodes them.
    out = greedy_continuations(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=1
    )
    return out, model, tokenizer


def _compare_greedy(
    bundle: Bundle,
    prompts: Sequence[str],
    want: Sequence[list[int]],
    got: Sequence[list[int]],
) -> tuple[float, int, str | None]:
    """Share of agreeing tokens, prompts answered identically, and the first difference."""
    agree = total = identical = 0
    first_diff = None
    for prompt, ref, out in zip(prompts, want, got, strict=True):
        length = max(len(ref), len(out))
        same = sum(1 for a, b in zip(ref, out, strict=False) if a == b)
        agree, total = agree + same, total + length
        if out == ref:
            identical += 1
        elif first_diff is None:
            first_diff = (
                f"{prompt[:60]!r}: torch {bundle.decode(ref)!r} vs onnx {bundle.decode(out)!r}"
            )
    return (agree / total if total else 1.0), identical, first_diff


def _logits_max_abs_diff(bundle: Bundle, model: Any, prompt_ids: Sequence[list[int]]) -> float:
    """Largest |logit difference| between the bundle and PyTorch over every prompt position."""
    import torch

    with torch.no_grad():
        diffs = [
            float(
                (
                    torch.from_numpy(bundle.logits(ids))
                    - model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                )
                .abs()
                .max()
            )
            for ids in prompt_ids
        ]
    return max(diffs)


def check_parity(
    model_dir: Path, bundle: Bundle, spec: ExportSpec, prompts: Sequence[str]
) -> dict[str, Any]:
    """Greedy tokens of the bundle vs PyTorch on ``prompts``; raises ExportError when off."""

    if not prompts:
        raise ExportError("no parity prompts: the champion has no held-out example to compare on")
    prompts = list(prompts)[: spec.parity_prompts]
    prompt_ids = [bundle.encode(p) for p in prompts]
    want, model, _ = reference_continuations(model_dir, prompt_ids, spec.parity_max_new_tokens)
    track = Progress("parity (ONNX Runtime)", len(prompt_ids), "prompt").track(prompt_ids)
    got = [bundle.generate_ids(ids, spec.parity_max_new_tokens) for ids in track]
    agreement, identical, first_diff = _compare_greedy(bundle, prompts, want, got)
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "identical": identical,
        "token_agreement": round(agreement, 6),
        "max_new_tokens": spec.parity_max_new_tokens,
    }
    if bundle.format == FORMAT_LOGITS:
        report["logits_max_abs_diff"] = _logits_max_abs_diff(bundle, model, prompt_ids)
        if report["logits_max_abs_diff"] > spec.logits_atol:
            raise ExportError(
                f"parity: logits differ by up to {report['logits_max_abs_diff']:.2e} "
                f"> {spec.logits_atol:g} from PyTorch"
            )
    if spec.precision == "fp32" and identical < len(prompts):
        raise ExportError(
            f"parity: {len(prompts) - identical}/{len(prompts)} greedy answers differ from "
            f"PyTorch, first {first_diff}"
        )
    if agreement < spec.min_token_agreement:
        raise ExportError(
            f"parity: {spec.precision} agrees with PyTorch on {agreement:.1%} of greedy tokens "
            f"< {spec.min_token_agreement:.0%} (export.min_token_agreement)"
        )
    return report
