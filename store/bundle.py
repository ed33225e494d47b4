"""Bundles: what consumers run. An exported model directory plus a checksummed manifest.

A bundle directory holds ``manifest.json`` = {"schema", "name", "version", ..., "files":
{"<path>": {"sha256", "bytes"}}} and the model, tokenizer and config files it lists. The
manifest is written last, so a directory with a manifest that verifies is whole. How
bundles are published under ``state_dir/bundles`` is in ``publish.py``.

This module never imports torch: consumers verify and run bundles with ONNX Runtime only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from aftertune.store.errors import BundleError

SCHEMA = "aftertune.bundle/1"
MANIFEST = "manifest.json"
FORMAT_GENAI = "onnxruntime-genai"  # genai_config.json + model.onnx with KV cache
FORMAT_LOGITS = "onnx-logits"  # model.onnx: (input_ids, attention_mask) -> logits


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def version_dir_name(version: int) -> str:
    return f"v{version}"


def parse_version(text: str | int) -> int:
    """'3', 'v3' or 3 -> 3; anything else is a BundleError."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"v?(\d+)", text.strip())
    if m is None:
        raise BundleError(f"{text!r} is not a version; use a number such as 3 or v3, or 'latest'")
    return int(m.group(1))


def safe_relpath(path: str) -> str:
    """A manifest path: relative, POSIX, no '..', no empty or hidden tricks. Else BundleError."""
    p = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or "\0" in path
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise BundleError(f"refused path {path!r}: bundle paths are relative and stay inside it")
    return str(p)


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """temp file, fsync, os.replace, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(bundle_dir: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Hash every file of ``bundle_dir`` and write manifest.json last (fsynced). Returns it."""
    files: dict[str, dict[str, Any]] = {}
    for path in _files(bundle_dir):
        rel = path.relative_to(bundle_dir).as_posix()
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest = {
        "schema": SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": files,
    }
    write_atomic(bundle_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def manifest_sha256(bundle_dir: Path) -> str:
    return file_sha256(Path(bundle_dir) / MANIFEST)


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir} is not a bundle: it has no {MANIFEST}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    check_manifest(manifest, str(path))
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    """The manifest's shape, before anything trusts it."""
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BundleError(f"{where}: not an {SCHEMA} manifest")
    if not isinstance(manifest.get("version"), int) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{where}: manifest lacks an integer 'version' or a 'files' map")
    for rel, entry in manifest["files"].items():
        safe_relpath(rel)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise BundleError(f"{where}: entry for {rel!r} needs 'sha256' and 'bytes'")


def verify_file(path: Path, rel: str, entry: Mapping[str, Any]) -> None:
    if not path.is_file():
        raise BundleError(f"{rel}: missing from the bundle")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise BundleError(f"{rel}: {size} bytes, the manifest says {entry['bytes']}")
    got = file_sha256(path)
    if got != entry["sha256"]:
        raise BundleError(f"{rel}: sha256 {got[:16]}… does not match the manifest's")


def verify_bundle(bundle_dir: Path) -> dict[str, Any]:
    """Every listed file present with its size and sha256, nothing extra; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for rel, entry in manifest["files"].items():
        verify_file(bundle_dir / rel, rel, entry)
    extra = {p.relative_to(bundle_dir).as_posix() for p in _files(bundle_dir)} - set(
        manifest["files"]
    )
    if extra:
        raise BundleError(f"{sorted(extra)[0]}: not listed in the manifest")
    return manifest


# --- the consumer side: run a bundle with ONNX Runtime (no torch) --------------------------


class Bundle:
    """A verified bundle, loaded and ready to answer. ``Bundle.open(DIR)`` is the entry point.

    The ``onnxruntime-genai`` format runs through onnxruntime-genai (KV cache); the
    ``onnx-logits`` fallback through plain onnxruntime with a greedy loop that recomputes the
    whole sequence per token (fine for short answers, quadratic for long ones).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.version: int = manifest["version"]
        self.format: str = manifest.get("format", "")
        prompt = manifest.get("prompt") or {}
        self._with_input: str = prompt.get("with_input", "{instruction}\n{input}\n")
        self._without_input: str = prompt.get("without_input", "{instruction}\n")
        self.eos_token_id: int | None = manifest.get("eos_token_id")
        self._model: Any = None
        self._tokenizer: Any = None
        self._session: Any = None
        # One onnxruntime-genai generator, rewound for each call: building one cost ~13 ms
        # a call on the development CPU, 10x a short answer's whole decode.
        self._generator: Any = None
        self._generator_lock = threading.Lock()
        if self.format == FORMAT_GENAI:
            import onnxruntime_genai as og

            self._model = og.Model(str(path))
            self._tokenizer = og.Tokenizer(self._model)
        elif self.format == FORMAT_LOGITS:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(
                str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            raise BundleError(f"{path}: unknown bundle format {self.format!r}")

    @classmethod
    def open(cls, path: Path | str, *, verify: bool = True) -> Bundle:
        """Load the bundle at ``path`` after checking every file against its manifest."""
        path = Path(path).resolve()
        manifest = verify_bundle(path) if verify else read_manifest(path)
        return cls(path, manifest)

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt the model was trained on (the template travels in the manifest)."""
        if input:
            return self._with_input.replace("{instruction}", instruction).replace("{input}", input)
        return self._without_input.replace("{instruction}", instruction)

    def encode(self, text: str) -> list[int]:
        if self.format == FORMAT_GENAI:
            return [int(t) for t in self._tokenizer.encode(text)]
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.format == FORMAT_GENAI:
            return str(self._tokenizer.decode(ids)) if ids else ""
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32) -> list[int]:
        """Greedy continuation of ``prompt_ids``: new tokens, up to (not including) EOS."""
        if not prompt_ids:
            raise BundleError("the prompt is empty")
        if self.format == FORMAT_GENAI:
            return self._generate_genai(prompt_ids, max_new_tokens)
        return self._generate_logits(prompt_ids, max_new_tokens)

    def generate(
        self,
        prompt: str | None = None,
        *,
        instruction: str | None = None,
        input: str = "",
        max_new_tokens: int = 32,
    ) -> str:
        """The greedy answer to a raw ``prompt`` or to an instruction (and input)."""
        if prompt is None:
            if not instruction:
                raise BundleError("give a prompt, or an instruction (and an input)")
            prompt = self.render(instruction, input)
        return self.decode(self.generate_ids(self.encode(prompt), max_new_tokens))

    def logits(self, prompt_ids: list[int]) -> Any:
        """Next-token logits at every position (onnx-logits format only), numpy [seq, vocab]."""
        import numpy as np

        if self._session is None:
            raise BundleError("logits are only exposed by onnx-logits bundles")
        ids = np.asarray([prompt_ids], dtype=np.int64)
        out = self._session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return out[0][0]

    def _generate_genai(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        import onnxruntime_genai as og

        context = int(self.manifest.get("context_length") or 0)
        with self._generator_lock:
            if not context:  # no known window: a generator sized for this call
                params = og.GeneratorParams(self._model)
                params.set_search_options(
                    max_length=len(prompt_ids) + max_new_tokens, do_sample=False
                )
                return self._decode_genai(
                    og.Generator(self._model, params), prompt_ids, max_new_tokens
                )
            if self._generator is None:
                params = og.GeneratorParams(self._model)
                params.set_search_options(max_length=context, do_sample=False)
                self._generator = og.Generator(self._model, params)
            else:
                self._generator.rewind_to(0)
            try:
                return self._decode_genai(self._generator, prompt_ids, max_new_tokens)
            except Exception:
                self._generator = None  # e.g. a prompt past the window: start clean next time
                raise

    def _decode_genai(
        self, generator: Any, prompt_ids: list[int], max_new_tokens: int
    ) -> list[int]:
        generator.append_tokens(prompt_ids)
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token == self.eos_token_id:
                break
            out.append(token)
        return out

    def _generate_logits(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = list(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.logits(ids)[-1].argmax())
            if token == self.eos_token_id:
                break
            out.append(token)
            ids.append(token)
        return out
