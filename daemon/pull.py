"""``aftertune pull``: fetch a published bundle, verify every byte, switch ``DIR/current``.

Sources: a daemon's HTTP server (``--server URL``) or a state directory on this machine
(``--from STATE_DIR``). Files land in ``DIR/.pull-vN-*`` and are checked against the
manifest's sha256 and size while they stream; only a whole, verified bundle is swapped in as
``DIR/vN`` (``store.files.staged_dir``) and only then does the ``DIR/current`` symlink move
(one rename). Any mismatch leaves ``current`` where it was. No torch import on this path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aftertune.store.bundle import (
    MANIFEST,
    check_manifest,
    manifest_sha256,
    safe_relpath,
    verify_bundle,
    version_dir_name,
)
from aftertune.store.bundles import point, published
from aftertune.store.errors import BundleError
from aftertune.store.files import staged_dir, write_atomic
from aftertune.store.layout import StateLayout

log = logging.getLogger(__name__)

CURRENT = "current"
CHUNK = 1 << 20


class Source(Protocol):
    """Where bundles come from."""

    def manifest(self, version: str) -> bytes: ...

    def open(self, version: int, path: str) -> Iterator[bytes]: ...


class DirSource:
    """A state directory's published bundles (``STATE_DIR/bundles``)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = StateLayout(state_dir).bundles
        if not self.root.is_dir():
            raise BundleError(f"{state_dir} has no bundles/ directory; nothing was published there")

    def manifest(self, version: str) -> bytes:
        return (published(self.root, version).path / MANIFEST).read_bytes()

    def open(self, version: int, path: str) -> Iterator[bytes]:
        with open(self.root / version_dir_name(version) / safe_relpath(path), "rb") as fh:
            yield from iter(lambda: fh.read(CHUNK), b"")


class HttpSource:
    """A daemon's HTTP server (``/v1/models/...``), with an optional bearer token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise BundleError(f"--server must be an http:// or https:// URL, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace")
            hint = " (give the server's token with --token)" if exc.code == 401 else ""
            raise BundleError(f"GET {self.url}{path}: HTTP {exc.code} {detail}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BundleError(f"cannot reach {self.url}: {exc}") from None

    def manifest(self, version: str) -> bytes:
        with self._get(f"/v1/models/{urllib.parse.quote(version)}/manifest") as response:
            return bytes(response.read())

    def open(self, version: int, path: str) -> Iterator[bytes]:
        quoted = urllib.parse.quote(safe_relpath(path))
        with self._get(f"/v1/models/{version}/files/{quoted}") as response:
            yield from iter(lambda: response.read(CHUNK), b"")


@dataclass(frozen=True)
class PullResult:
    version: int
    path: Path
    manifest_sha256: str
    downloaded: bool  # False: ``current`` already was this bundle
    bytes: int = 0


def pull(source: Source, to_dir: Path, version: str = "latest") -> PullResult:
    """Install ``version`` from ``source`` under ``to_dir`` and point ``to_dir/current`` at it."""
    raw = source.manifest(version)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"the source's manifest is not valid JSON: {exc}") from None
    check_manifest(manifest, "the source's manifest")
    number: int = manifest["version"]
    digest = hashlib.sha256(raw).hexdigest()
    to_dir = Path(to_dir)
    to_dir.mkdir(parents=True, exist_ok=True)
    final = to_dir / version_dir_name(number)
    if _installed(final, digest):
        already = os.path.realpath(to_dir / CURRENT) == str(final.resolve())
        if not already:
            point(to_dir / CURRENT, final.name)
        return PullResult(number, final, digest, downloaded=False)

    total = 0
    # Swapped in whole (a damaged earlier copy swapped out) or not at all.
    with staged_dir(final, prefix=f".pull-{final.name}-") as staging:
        for rel, entry in sorted(manifest["files"].items()):
            total += _download(source, number, rel, entry, staging / safe_relpath(rel))
        write_atomic(staging / MANIFEST, raw)
        verify_bundle(staging)
    point(to_dir / CURRENT, final.name)
    return PullResult(number, final, digest, downloaded=True, bytes=total)


def _installed(final: Path, digest: str) -> bool:
    """A whole local copy of exactly this manifest is already there."""
    if not (final / MANIFEST).is_file() or manifest_sha256(final) != digest:
        return False
    try:
        verify_bundle(final)
    except BundleError as exc:
        log.warning("local copy %s is damaged (%s); downloading it again", final, exc)
        return False
    return True


def _download(source: Source, version: int, rel: str, entry: dict[str, Any], dest: Path) -> int:
    """Stream one file to ``dest``, refusing it once it outgrows the manifest's size.

    Hashed as the bytes arrive rather than with ``store.files.file_sha256`` afterwards: a
    stream can be cut off at the first byte too many, and a bad file is named before the
    next one downloads.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as fh:
        for chunk in source.open(version, rel):
            size += len(chunk)
            if size > entry["bytes"]:
                raise BundleError(f"{rel}: more than the manifest's {entry['bytes']} bytes")
            digest.update(chunk)
            fh.write(chunk)
    if size != entry["bytes"]:
        raise BundleError(f"{rel}: {size} bytes arrived, the manifest says {entry['bytes']}")
    if digest.hexdigest() != entry["sha256"]:
        raise BundleError(f"{rel}: sha256 does not match the manifest; refusing the bundle")
    log.debug("%s: %d bytes verified", rel, size)
    return size
