"""The bundle format: an exported model directory plus a checksummed manifest.

A bundle directory holds ``manifest.json`` = {"schema", "name", "version", ..., "files":
{"<path>": {"sha256", "bytes"}}, "contents_sha256"} and the model, tokenizer and config files
it lists. The manifest is written last, so a directory with a manifest that verifies is
whole. ``contents_sha256`` covers the manifest itself (everything else in it, as canonical
JSON): a flipped byte in a field no other check reads (the prompt template, lineage,
``created_at``) is caught too. How bundles are published under ``state_dir/bundles`` is in
``store/bundles.py``; how consumers run one is in ``bundle.py`` beside this module.

This module never imports torch: consumers verify bundles without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from aftertune.store.errors import BundleError
from aftertune.store.files import file_sha256, write_atomic

SCHEMA = "aftertune.bundle/2"  # what write_manifest writes: contents_sha256 required
# Manifests written before contents_sha256 existed: still read, without that check.
LEGACY_SCHEMAS = ("aftertune.bundle/1",)
MANIFEST = "manifest.json"
FORMAT_GENAI = "onnxruntime-genai"  # genai_config.json + model.onnx with KV cache
FORMAT_LOGITS = "onnx-logits"  # model.onnx: (input_ids, attention_mask) -> logits
# model.onnx: (input_ids, attention_mask) -> normalised embedding, plus each task's candidates
FORMAT_RANKING = "onnx-ranking"
# What each format cannot run without (each format's runtime beside this module loads them;
# the learners' exporters write them). A manifest that lacks one is refused before anything is downloaded.
REQUIRED_FILES = {
    FORMAT_GENAI: ("genai_config.json", "model.onnx"),
    FORMAT_LOGITS: ("model.onnx", "tokenizer.json"),
    FORMAT_RANKING: ("model.onnx", "tokenizer.json", "candidates.json", "candidate_embeddings.npy"),
}
# The largest manifest anyone reads (pull, server, consumer): a real one is a few KiB, so a
# bigger one is refused before it is parsed rather than read whole into memory.
MAX_MANIFEST_BYTES = 16 << 20
# Versions are 1..999,999,999: nine ASCII digits at most, so a URL or a manifest can never
# make a number (or a directory name) of unbounded size.
MAX_VERSION_DIGITS = 9
_VERSION = re.compile(rf"v?([0-9]{{1,{MAX_VERSION_DIGITS}}})", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
# The manifest's checksum of its own contents: required by SCHEMA, absent from legacy ones
# (a flip in the schema string or in this key's name is then refused, not read as legacy).
CONTENTS_SHA256 = "contents_sha256"


def version_dir_name(version: int) -> str:
    return f"v{version}"


def parse_version(text: str | int) -> int:
    """'3', 'v3' or 3 -> 3; anything else (0, -1, 'v١', ten digits, True) is a BundleError."""
    if isinstance(text, int) and not isinstance(text, bool):
        number = text
    else:
        m = _VERSION.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            shown = text if len(str(text)) <= 40 else f"{str(text)[:40]}…"
            raise BundleError(
                f"{shown!r} is not a version; use a number such as 3 or v3, or 'latest'"
            )
        number = int(m.group(1))
    if not 1 <= number < 10**MAX_VERSION_DIGITS:
        raise BundleError(f"version {number} is out of range: versions are 1 to 999999999")
    return number


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


def resolve_inside(bundle_dir: Path, rel: str) -> Path:
    """The real path of ``rel`` in ``bundle_dir``; BundleError if a symlink leads out of it."""
    root = Path(bundle_dir).resolve()
    real = (root / safe_relpath(rel)).resolve()
    if not real.is_relative_to(root):
        raise BundleError(f"refused path {rel!r}: it resolves outside the bundle directory")
    return real


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def write_manifest(bundle_dir: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Hash every file of ``bundle_dir`` and write manifest.json last (fsynced). Returns it."""
    files: dict[str, dict[str, Any]] = {}
    for path in _files(bundle_dir):
        rel = path.relative_to(bundle_dir).as_posix()
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest = seal(
        {
            "schema": SCHEMA,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **fields,
            "files": files,
        }
    )
    write_atomic(bundle_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def seal(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` with its ``contents_sha256`` (re)computed, as a publisher writes it."""
    return {**manifest, CONTENTS_SHA256: _contents_sha256(manifest)}


def _contents_sha256(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum."""
    body = {k: v for k, v in manifest.items() if k != CONTENTS_SHA256}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_sha256(bundle_dir: Path) -> str:
    return file_sha256(Path(bundle_dir) / MANIFEST)


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    """The manifest of ``bundle_dir``, read (at most MAX_MANIFEST_BYTES) and checked."""
    path = Path(bundle_dir) / MANIFEST
    try:
        with open(resolve_inside(Path(bundle_dir), MANIFEST), "rb") as fh:
            raw = read_bounded(fh, MAX_MANIFEST_BYTES, str(path))
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir} is not a bundle: it has no {MANIFEST}") from None
    manifest = parse_manifest(raw, str(path))
    return manifest


def read_bounded(stream: BinaryIO, limit: int, where: str) -> bytes:
    """All of ``stream`` if it holds at most ``limit`` bytes, else BundleError (reads limit+1)."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{where}: larger than the {limit}-byte limit on manifests; refused")
    return bytes(data)


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Manifest bytes → the checked manifest, or BundleError naming ``where``."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: larger than the {MAX_MANIFEST_BYTES}-byte limit; refused")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{where} is not valid JSON: {str(exc)[:200]}") from None
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    """The manifest's shape, before anything trusts it: BundleError naming the first fault.

    ``version`` a positive int (not a bool), ``format`` one we can run, ``files`` every file
    that format needs, each entry a 64-hex-digit lowercase ``sha256`` and an int ``bytes``.
    """
    if not isinstance(manifest, dict) or manifest.get("schema") not in (SCHEMA, *LEGACY_SCHEMAS):
        raise BundleError(f"{where}: not an {SCHEMA} manifest")
    version = manifest.get("version")
    if type(version) is not int:
        raise BundleError(f"{where}: 'version' must be an integer, got {version!r:.40}")
    try:
        parse_version(version)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None
    fmt = manifest.get("format")
    if fmt not in REQUIRED_FILES:
        raise BundleError(
            f"{where}: 'format' must be one of {sorted(REQUIRED_FILES)}, got {fmt!r:.40}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{where}: manifest lacks a 'files' map")
    for rel, entry in files.items():
        if safe_relpath(rel) == MANIFEST:
            raise BundleError(f"{where}: the manifest cannot list itself")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.fullmatch(entry["sha256"])
            or type(entry.get("bytes")) is not int
            or entry["bytes"] < 0
        ):
            raise BundleError(
                f"{where}: entry for {rel!r} needs 'sha256' (64 lowercase hex digits) and "
                "'bytes' (a non-negative integer)"
            )
    missing = [name for name in REQUIRED_FILES[fmt] if name not in files]
    if missing:
        raise BundleError(
            f"{where}: a bundle of format {fmt} needs {missing[0]}; its manifest does not list it"
        )
    _check_runtime_fields(manifest, where)
    # Last, so a manifest edited by hand is told its first real fault.
    checksum = manifest.get(CONTENTS_SHA256)
    if checksum is None and manifest["schema"] == SCHEMA:
        raise BundleError(f"{where}: an {SCHEMA} manifest needs its {CONTENTS_SHA256}")
    if checksum is not None and checksum != _contents_sha256(manifest):
        raise BundleError(
            f"{where}: its contents do not match its {CONTENTS_SHA256}: the manifest is damaged"
        )


def _check_runtime_fields(manifest: dict[str, Any], where: str) -> None:
    """The optional fields the consumer runtime reads, when present, have the right types."""
    prompt = manifest.get("prompt")
    if prompt is not None and (
        not isinstance(prompt, dict) or not all(isinstance(v, str) for v in prompt.values())
    ):
        raise BundleError(f"{where}: 'prompt' must map template names to strings")
    for key in ("eos_token_id", "context_length", "max_length", "pad_token_id"):
        value = manifest.get(key)
        # Hugging Face configs give some models several EOS ids.
        values = value if key == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(type(v) is int and v >= 0 for v in values):
            raise BundleError(f"{where}: {key!r} must be a non-negative integer or null")


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
        verify_file(resolve_inside(bundle_dir, rel), rel, entry)
    extra = {p.relative_to(bundle_dir).as_posix() for p in _files(bundle_dir)} - set(
        manifest["files"]
    )
    if extra:
        raise BundleError(f"{sorted(extra)[0]}: not listed in the manifest")
    return manifest
