"""The generative kind's export: champion (merged Hugging Face checkpoint) → ONNX bundle, parity-checked against PyTorch.

Primary path: onnxruntime-genai's model builder (KV cache, ``genai_config.json``; fp32,
int8 or int4; CPU or CUDA), run as a subprocess so its memory and failures stay its own.
Fallback when that bundle fails (reason logged and kept in the manifest): the builder does
not know the architecture (GPT-2), its tokenizer does not reproduce the training
tokenizer's ids on the regression prompts (SentencePiece-style tokenizers), or parity
fails. It is ``torch.onnx.export(dynamo=True)`` of input_ids + attention_mask → logits with
dynamic batch and sequence axes, beside the checkpoint's ``tokenizer.json``.

Parity first compares the bundle's prompt ids with the training tokenizer's (BOS
included), then greedy answers with PyTorch's. Any failure is an ``ExportError`` with its
reason; when every exporter fails, the reasons of all of them.

Everything happens in a staging directory the caller owns; nothing here publishes.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aftertune.learners.base_model import load_base
from aftertune.learners.errors import ExportError
from aftertune.learners.export import ExportResult, ExportSpec
from aftertune.learners.generate import greedy_continuations
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import FORMAT_GENAI, FORMAT_LOGITS, write_manifest
from aftertune.store.progress import Progress

log = logging.getLogger(__name__)

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
BUILDER_TIMEOUT_S = 1800
EXTERNAL_DATA_BYTES = 1 << 30  # fp32 weights above this go to model.onnx.data (protobuf: 2 GiB)
# int4 with the builder's defaults (RTN, block 32) agreed with fp32 on 88 % of greedy tokens
# of the tiny base; k-quant with the last MatMul and sensitive layers in int8 on 96-99 %,
# at 0.25x the fp32 size (bench/runtime.py, docs/benchmarks.md).
EXTRA_OPTIONS = {"int4": ["algo_config=k_quant_mixed"]}


def export_bundle(
    model_dir: Path,
    staging: Path,
    spec: ExportSpec,
    prompts: Sequence[str],
    manifest_fields: Mapping[str, Any],
) -> ExportResult:
    """Export ``model_dir`` into the empty ``staging`` dir, check parity, write the manifest.

    Raises ExportError (the reason a candidate is rejected) when no exporter succeeds or
    the bundle's answers differ from PyTorch's beyond what ``spec`` allows. Whatever fails
    inside (the builder, a tokenizer, a library) becomes an ExportError with its reason,
    never another exception: a challenger is rejected, not left half-judged.
    """
    model_dir, staging = Path(model_dir), Path(staging)
    try:
        return _export_verified(model_dir, staging, spec, prompts, manifest_fields)
    except ExportError:
        raise
    except Exception as exc:  # a library failing in a way nobody foresaw is still a reason
        log.debug("export of %s failed", model_dir, exc_info=True)  # the reason is raised
        raise ExportError(_reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {exc}"


def _methods(spec: ExportSpec) -> tuple[str, ...]:
    """The exporters to try, in order: auto is the builder, then the torch.onnx fallback."""
    return ("genai", "torch") if spec.method == "auto" else (spec.method,)


def _export_verified(
    model_dir: Path,
    staging: Path,
    spec: ExportSpec,
    prompts: Sequence[str],
    manifest_fields: Mapping[str, Any],
) -> ExportResult:
    """Each exporter in turn until one's bundle passes parity; its manifest is written."""
    reference = Reference.load(model_dir, prompts, spec)
    config = _read_json(model_dir / "config.json")
    failures: list[str] = []
    for method in _methods(spec):
        seconds: dict[str, float] = {}
        try:
            header = _header(method, spec, config, manifest_fields)
            t0 = time.monotonic()
            with library_output_to_log():
                _export_onnx(method, model_dir, staging, spec)
            seconds["export_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            # A manifest without file hashes lets the consumer runtime load the staged model.
            parity = _verify(Bundle(staging, {**header, "files": {}}), reference, spec)
            seconds["parity_s"] = time.monotonic() - t0
        except Exception as exc:
            failures.append(f"{method}: {_reason(exc)}" if spec.method == "auto" else _reason(exc))
            log.warning("%s export failed: %s", method, failures[-1])
            log.debug("%s export failure in full", method, exc_info=True)
            _empty(staging)
            continue
        manifest = write_manifest(
            staging,
            {
                **manifest_fields,
                **header,
                "target": spec.target,
                "parity": parity,
                "export": {
                    "method": "genai-builder" if method == "genai" else "torch.onnx(dynamo)",
                    "fallback_reason": "; ".join(failures) or None,
                    "seconds": round(seconds["export_s"], 3),
                },
            },
        )
        return ExportResult(staging, manifest, seconds)
    raise ExportError("; ".join(failures))


def _header(
    method: str, spec: ExportSpec, config: Mapping[str, Any], fields: Mapping[str, Any]
) -> dict[str, Any]:
    """What the consumer runtime reads from a manifest (the staged bundle needs it too)."""
    return {
        "format": FORMAT_GENAI if method == "genai" else FORMAT_LOGITS,
        "version": fields["version"],
        "prompt": {
            "with_input": spec.template.with_input,
            "without_input": spec.template.without_input,
        },
        "eos_token_id": config.get("eos_token_id"),
        "context_length": config.get("max_position_embeddings"),
        # The torch.onnx fallback exports the fp32 weights whatever was asked.
        "precision": spec.precision if method == "genai" else "fp32",
    }


def _export_onnx(method: str, model_dir: Path, staging: Path, spec: ExportSpec) -> None:
    """ONNX files of ``method`` and the checkpoint's tokenizer/config files into ``staging``."""
    if method == "genai":
        _run_builder(model_dir, staging, spec)
    else:
        _torch_export(model_dir, staging)
    for name in CHECKPOINT_FILES:
        if (model_dir / name).is_file() and not (staging / name).exists():
            shutil.copy2(model_dir / name, staging / name)


@contextmanager
def library_output_to_log() -> Iterator[None]:
    """What exporters print (torch.onnx's ``[torch.onnx] ...`` lines) goes to the log, never
    to stdout, where ``--json`` commands print their answer; writes to file descriptor 1
    from native code go to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with redirect_stdout(_LogLines(log)):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _LogLines(io.TextIOBase):
    """A text stream whose lines become INFO records of ``logger``."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger, self._pending = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self._logger.info("%s", line.rstrip())
        return len(text)


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
            # One file while it fits; protobuf cannot hold more than 2 GiB, so a bigger model
            # keeps its weights in model.onnx.data beside it (the manifest lists both).
            external_data=model.num_parameters() * 4 > EXTERNAL_DATA_BYTES,
            optimize=True,
        )
    except Exception as exc:  # the exporter raises many types; the reason is what matters
        raise ExportError(f"torch.onnx export failed: {type(exc).__name__}: {exc}") from exc


def reference_continuations(
    model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """PyTorch ``generate`` greedy tokens per prompt (EOS cut), one prompt at a time."""
    # One prompt at a time, unpadded, as the bundle decodes them.
    return greedy_continuations(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=1
    )


@dataclass
class Reference:
    """What a bundle must reproduce: the training tokenizer's ids of the regression prompts
    (BOS and all) and PyTorch's fp32 greedy answers to them. Computed once per export."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    continuations: list[list[int]]
    model: Any

    @classmethod
    def load(cls, model_dir: Path, prompts: Sequence[str], spec: ExportSpec) -> Reference:
        import torch

        if not prompts:
            raise ExportError(
                "no parity prompts: the champion has no held-out example to compare on"
            )
        prompts = list(prompts)[: spec.parity_prompts]
        model, tokenizer = load_base(model_dir, device="cpu", dtype=torch.float32)
        # Encoded as training and evaluation encode a prompt (data.encode_example).
        prompt_ids = [list(tokenizer.encode(p)) for p in prompts]
        want = reference_continuations(model, tokenizer, prompt_ids, spec.parity_max_new_tokens)
        return cls(prompts, prompt_ids, want, model)


def _compare_prompt_ids(bundle: Bundle, reference: Reference) -> int:
    """How many prompts the bundle encodes exactly as training did; ExportError if not all.

    A tokenizer that differs (onnxruntime-genai reading a SentencePiece-style tokenizer.json
    returns other ids, even -1) makes every later comparison meaningless.
    """
    mismatched = [
        (prompt, want, got)
        for prompt, want in zip(reference.prompts, reference.prompt_ids, strict=True)
        if (got := bundle.encode(prompt)) != want
    ]
    if mismatched:
        prompt, want, got = mismatched[0]
        raise ExportError(
            f"tokenizer: the bundle encodes {len(mismatched)}/{len(reference.prompts)} prompts"
            f" unlike the training tokenizer, first {prompt[:40]!r}: training {want[:12]}"
            f" vs bundle {got[:12]}"
        )
    return len(reference.prompts)


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
    """The bundle's prompt ids and greedy tokens vs the training tokenizer's and PyTorch's on
    ``prompts``; raises ExportError when off. Returns the report the manifest keeps."""
    return _verify(bundle, Reference.load(Path(model_dir), prompts, spec), spec)


def _verify(bundle: Bundle, reference: Reference, spec: ExportSpec) -> dict[str, Any]:
    identical_ids = _compare_prompt_ids(bundle, reference)
    max_new = spec.parity_max_new_tokens
    track = Progress("parity (ONNX Runtime)", len(reference.prompt_ids), "prompt")
    got = [bundle.generate_ids(ids, max_new) for ids in track.track(reference.prompt_ids)]
    agreement, identical, first_diff = _compare_greedy(
        bundle, reference.prompts, reference.continuations, got
    )
    prompts = len(reference.prompts)
    report: dict[str, Any] = {
        "prompts": prompts,
        "prompt_ids_identical": identical_ids,
        "identical": identical,
        "token_agreement": round(agreement, 6),
        "max_new_tokens": max_new,
    }
    if bundle.format == FORMAT_LOGITS:
        report["logits_max_abs_diff"] = _logits_max_abs_diff(
            bundle, reference.model, reference.prompt_ids
        )
        if report["logits_max_abs_diff"] > spec.logits_atol:
            raise ExportError(
                f"parity: logits differ by up to {report['logits_max_abs_diff']:.2e} "
                f"> {spec.logits_atol:g} from PyTorch"
            )
    precision = spec.precision if bundle.format == FORMAT_GENAI else "fp32"
    if precision == "fp32" and identical < prompts:
        raise ExportError(
            f"parity: {prompts - identical}/{prompts} greedy answers differ from "
            f"PyTorch, first {first_diff}"
        )
    if agreement < spec.min_token_agreement:
        raise ExportError(
            f"parity: {precision} agrees with PyTorch on {agreement:.1%} of greedy tokens "
            f"< {spec.min_token_agreement:.0%} (export.min_token_agreement)"
        )
    return report
