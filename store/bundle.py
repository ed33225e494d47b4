"""The bundle format: an exported model directory plus a checksummed manifest.

A bundle directory holds ``manifest.json`` = {"schema", "name", "version", ..., "files":
{"<path>": {"sha256", "bytes"}}} and the model, tokenizer and config files it lists. The
manifest is written last, so a directory with a manifest that verifies is whole. How
bundles are published under ``state_dir/bundles`` is in ``bundles.py``; how consumers
run one is in ``consumer.py``.

This module never imports torch: consumers verify bundles without it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from aftertune.store.errors import BundleError
from aftertune.store.files import file_sha256, write_atomic

SCHEMA = "aftertune.bundle/1"
MANIFEST = "manifest.json"
FORMAT_GENAI = "onnxruntime-genai"  # genai_config.json + model.onnx with KV cache
FORMAT_LOGITS = "onnx-logits"  # model.onnx: (input_ids, attention_mask) -> logits


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
