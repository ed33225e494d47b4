"""``aftertune pull``: fetch a published bundle, verify every byte, switch ``DIR/current``.

Sources: a daemon's HTTP server (``--server URL``) or a state directory on this machine
(``--from STATE_DIR``). Files land in ``DIR/.pull-vN-*`` and are checked against the
manifest's sha256 and size while they stream (a file is cut off at the first byte past its
declared size; a manifest past ``MAX_MANIFEST_BYTES`` is refused unread). Only a whole,
verified bundle is swapped in as ``DIR/vN``, and only then does the ``DIR/current`` symlink
move (one rename). Any mismatch leaves ``current`` where it was, and the directory
``current`` points at is never modified. No torch import on this path.

``pull_published`` is the same fetch for a daemon mirroring another daemon's promotion
(``daemon/bundle_follow.py``): it installs into a state dir's ``bundles/`` instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from aftertune.store.bundles import LATEST, install, new_staging_dir, point, published
from aftertune.store.consumer.deadline import HttpStatus, fetch
from aftertune.store.consumer.format import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    manifest_sha256,
    parse_manifest,
    parse_version,
    read_bounded,
    resolve_inside,
    safe_relpath,
    verify_bundle,
    version_dir_name,
)
from aftertune.store.errors import BundleError
from aftertune.store.failpoints import failpoint
from aftertune.store.files import fsync_dir, fsync_tree, replace_dir, write_atomic
from aftertune.store.layout import StateLayout
from aftertune.store.progress import Progress

log = logging.getLogger(__name__)

CURRENT = "current"
CHUNK = 1 << 20
PULL_PREFIX = ".pull-"
# A file's total deadline grows by one second per this many bytes (see HttpSource): slower
# than this, a pull is given up rather than held open by a server that drips its bytes.
MIN_BYTES_PER_S = 256 * 1024


class Source(Protocol):
    """Where bundles come from."""

    def manifest(self, version: str) -> bytes:
        """The raw manifest; BundleError past MAX_MANIFEST_BYTES."""

    def open(self, version: int, path: str, size: int) -> Iterator[bytes]:
        """The file's bytes, never more than ``size`` + 1 of them: one past is enough to refuse."""


def _chunks(read: Callable[[int], bytes], size: int) -> Iterator[bytes]:
    """Read ``size`` + 1 bytes at most, CHUNK at a time."""
    left = size + 1
    while left > 0:
        chunk = read(min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _open_regular(path: Path, rel: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (no FIFO or device to hang on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"refused {rel!r}: not a regular file")
    return os.fdopen(fd, "rb")


class DirSource:
    """A state directory's published bundles (``STATE_DIR/bundles``).

    Like the HTTP server, it reads nothing that resolves outside a bundle's directory: a
    symlink out of it (to /etc/passwd, say) is refused, not copied and verified.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.root = StateLayout(state_dir).bundles
        if not self.root.is_dir():
            raise BundleError(f"{state_dir} has no bundles/ directory; nothing was published there")

    def _bundle_dir(self, version: int | str) -> Path:
        number = None if version == LATEST else parse_version(version)
        if number is not None and not (self.root / version_dir_name(number)).is_dir():
            raise BundleError(why_unpublished(self.state_dir, number))
        path = published(self.root, version).path
        if path.is_symlink() or not path.resolve().is_relative_to(self.root.resolve()):
            raise BundleError(f"refused {path}: a bundle directory must lie inside {self.root}")
        return path

    def manifest(self, version: str) -> bytes:
        bundle = self._bundle_dir(version)
        with _open_regular(resolve_inside(bundle, MANIFEST), MANIFEST) as fh:
            return read_bounded(fh, MAX_MANIFEST_BYTES, str(bundle / MANIFEST))

    def open(self, version: int, path: str, size: int) -> Iterator[bytes]:
        real = resolve_inside(self._bundle_dir(version), path)
        try:
            fh = _open_regular(real, path)
        except FileNotFoundError:
            raise BundleError(f"{path}: missing from the source bundle") from None
        with fh:
            yield from _chunks(fh.read, size)


class HttpSource:
    """A daemon's HTTP server (``/v1/models/...``), with an optional bearer token.

    Every request has a total deadline (``store/consumer/deadline.py``): ``timeout`` for
    connecting and the answer's headers, then one second more per ``min_rate`` bytes of the
    body (its Content-Length, or the most it may hold). A server that drips bytes fails the
    pull in bounded time.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        min_rate: float = MIN_BYTES_PER_S,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise BundleError(f"--server must be an http:// or https:// URL, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.min_rate = min_rate

    @contextlib.contextmanager
    def _get(self, path: str, limit: int) -> Iterator[Any]:
        """The body of GET ``path``, refused at once if it announces more than ``limit``."""
        request = urllib.request.Request(self.url + path)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with fetch(request, self.timeout) as body:
                length = body.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > limit:
                    raise BundleError(
                        f"GET {self.url}{path}: {length} bytes, more than the {limit} expected"
                    )
                body.deadline.extend((int(length) if length.isdigit() else limit) / self.min_rate)
                yield body
        except HttpStatus as exc:
            hint = " (give the server's token with --token)" if exc.code == 401 else ""
            raise BundleError(
                f"GET {self.url}{path}: HTTP {exc.code}: {_detail(exc.body)}{hint}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BundleError(
                f"cannot reach the aftertune server at {self.url} ({reason}): is the daemon "
                "running (`aftertune serve`, `systemctl status aftertune`) and listening on "
                "that address (server.host, server.port)? On the daemon's machine, "
                "`aftertune pull --from STATE_DIR` needs no server"
            ) from None

    def manifest(self, version: str) -> bytes:
        path = f"/v1/models/{urllib.parse.quote(version)}/manifest"
        with self._get(path, MAX_MANIFEST_BYTES) as body:
            return read_bounded(body, MAX_MANIFEST_BYTES, f"{self.url}{path}")

    def open(self, version: int, path: str, size: int) -> Iterator[bytes]:
        quoted = urllib.parse.quote(safe_relpath(path))
        with self._get(f"/v1/models/{version}/files/{quoted}", size) as body:
            yield from _chunks(body.read, size)


def _detail(body: str) -> str:
    """FastAPI's ``{"detail": "..."}`` as its text; any other body as it came."""
    try:
        found = json.loads(body)
    except ValueError:
        return body[:500]
    detail = found.get("detail") if isinstance(found, dict) else None
    return detail if isinstance(detail, str) else body[:500]


def why_unpublished(state_dir: Path, version: int, store_url: str | None = None) -> str:
    """Why ``state_dir`` has no bundle ``version``, from its registry (SQLite in the state
    dir, or ``store_url``): rejected (with the gate's reasons), never promoted, or pruned."""
    from aftertune.store.errors import RegistryError
    from aftertune.store.registry import Registry, VersionState

    if store_url is None and not StateLayout(state_dir).registry_db.is_file():
        return f"v{version} is not published: {state_dir} has no registry"
    with Registry(state_dir, store_url) as registry:
        try:
            found = registry.get(version)
        except RegistryError:
            return f"v{version} does not exist; `aftertune models` lists the versions"
    if found.state is VersionState.REJECTED:
        reasons = "; ".join(found.gate.get("reasons", [])) or "no reason recorded"
        return f"v{version} was rejected, so it was never published: {reasons}"
    if found.state in (VersionState.PROMOTED, VersionState.RETIRED):
        return (
            f"v{version} was promoted but its bundle is gone (pruned: export.keep keeps the "
            "newest bundles); pull a newer version or `aftertune rollback` to republish it"
        )
    return f"v{version} is {found.state.value}: only promoted versions are published"


@dataclass(frozen=True)
class PullResult:
    version: int
    path: Path
    manifest_sha256: str
    downloaded: bool  # False: ``current`` already was this bundle
    bytes: int = 0


def pull(source: Source, to_dir: Path, version: str = LATEST) -> PullResult:
    """Install ``version`` from ``source`` under ``to_dir`` and point ``to_dir/current`` at it.

    ``current`` only ever moves to a whole, verified directory, and the directory it points
    at is never modified: re-pulling that same version goes through a stand-in (see
    ``_replace_current``). One pull at a time per ``to_dir`` (a lock on the directory).
    """
    raw = source.manifest(version)
    manifest = parse_manifest(raw, "the source's manifest")
    number: int = manifest["version"]
    if version != LATEST and parse_version(version) != number:
        raise BundleError(f"asked for v{parse_version(version)}, the source sent v{number}")
    digest = hashlib.sha256(raw).hexdigest()
    to_dir = Path(to_dir)
    to_dir.mkdir(parents=True, exist_ok=True)
    with _locked(to_dir):
        _remove_leftovers(to_dir)
        final = to_dir / version_dir_name(number)
        if _installed(final, digest):
            if not _is_current(to_dir, final):
                point(to_dir / CURRENT, final.name)
                _remove_leftovers(to_dir)  # a stand-in ``current`` was on
            return PullResult(number, final, digest, downloaded=False)
        staging = Path(tempfile.mkdtemp(prefix=f"{PULL_PREFIX}{final.name}-", dir=to_dir))
        try:
            total = _fetch(source, manifest, raw, staging)
            failpoint("pull.verified")
            if _is_current(to_dir, final):
                _replace_current(to_dir, staging, final)
            else:
                replace_dir(staging, final)  # a damaged copy nobody points at is swapped out
                point(to_dir / CURRENT, final.name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _remove_leftovers(to_dir)  # a stand-in ``current`` was on before
    return PullResult(number, final, digest, downloaded=True, bytes=total)


def pull_published(
    source: Source, bundles_dir: Path, version: int, expected_sha256: str | None = None
) -> Path:
    """Install ``version`` from ``source`` as ``bundles_dir/vN`` of a daemon (another daemon's
    promotion, bundle_follow.py): staged, verified, renamed in; ``latest`` is not moved.

    ``expected_sha256`` is the sha256 the registry recorded for the manifest: another manifest
    is refused before any file is fetched, and a local ``vN`` with another one is replaced.
    """
    raw = source.manifest(str(version))
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise BundleError(
            f"v{version}: the source's manifest has sha256 {digest}, the registry recorded "
            f"{expected_sha256}; refused, nothing fetched"
        )
    manifest = parse_manifest(raw, "the source's manifest")
    if manifest["version"] != version:
        raise BundleError(f"asked for v{version}, the source sent v{manifest['version']}")
    staging = new_staging_dir(bundles_dir, version)
    try:
        _fetch(source, manifest, raw, staging)
        final = Path(bundles_dir) / version_dir_name(version)
        if expected_sha256 is not None and final.exists() and _sha_or_none(final) != digest:
            replace_dir(staging, final)  # a copy the registry does not know is swapped out
            return final
        return install(staging, bundles_dir, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sha_or_none(bundle_dir: Path) -> str | None:
    try:
        return manifest_sha256(bundle_dir)
    except OSError:
        return None


def _fetch(source: Source, manifest: dict[str, Any], raw: bytes, staging: Path) -> int:
    """Every file of ``manifest`` into ``staging``, then the manifest, verified and fsynced."""
    total = 0
    expected = sum(int(entry["bytes"]) for entry in manifest["files"].values())
    progress = Progress(f"pull v{manifest['version']}", expected, "B", unit_scale=True)
    with progress:
        for rel, entry in sorted(manifest["files"].items()):
            dest = staging / safe_relpath(rel)
            total += _download(source, manifest["version"], rel, entry, dest, progress)
    write_atomic(staging / MANIFEST, raw)
    verify_bundle(staging)
    fsync_tree(staging)
    return total


def _replace_current(to_dir: Path, staging: Path, final: Path) -> None:
    """Swap a new copy in at ``final`` while ``current`` points there, never at a half one.

    ``current`` first moves to a stand-in (hard links to the new, verified files), then
    ``final`` is replaced, then ``current`` comes back to it. A kill at any step leaves
    ``current`` on the old copy, the stand-in or the new copy, each whole; the next pull
    removes what is left.
    """
    standin = to_dir / f"{PULL_PREFIX}{final.name}-standin-{os.getpid()}"
    shutil.rmtree(standin, ignore_errors=True)
    shutil.copytree(staging, standin, copy_function=os.link)
    fsync_tree(standin)
    fsync_dir(to_dir)
    point(to_dir / CURRENT, standin.name)
    failpoint("pull.standin")
    replace_dir(staging, final)
    point(to_dir / CURRENT, final.name)
    shutil.rmtree(standin, ignore_errors=True)


def _is_current(to_dir: Path, final: Path) -> bool:
    return os.path.realpath(to_dir / CURRENT) == os.path.realpath(final)


@contextlib.contextmanager
def _locked(to_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``to_dir`` itself (flock), released by the kernel if we die."""
    fd = os.open(to_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_leftovers(to_dir: Path) -> None:
    """What a killed pull left (staging, stand-ins, swapped-out copies), except ``current``."""
    keep = os.path.realpath(to_dir / CURRENT)
    for entry in to_dir.iterdir():
        name = entry.name
        leftover = name.startswith(PULL_PREFIX) or ".old-" in name or ".tmp-" in name
        if not leftover or not name.startswith(".") or os.path.realpath(entry) == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted pull", entry)


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


def _download(
    source: Source,
    version: int,
    rel: str,
    entry: dict[str, Any],
    dest: Path,
    progress: Progress | None = None,
) -> int:
    """Stream one file to ``dest``, refusing it at the first byte past the manifest's size.

    Hashed as the bytes arrive rather than with ``store.files.file_sha256`` afterwards: a
    stream can be cut off at the first byte too many, and a bad file is named before the
    next one downloads.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as fh:
        for chunk in source.open(version, rel, entry["bytes"]):
            size += len(chunk)
            if size > entry["bytes"]:
                raise BundleError(f"{rel}: more than the manifest's {entry['bytes']} bytes")
            digest.update(chunk)
            fh.write(chunk)
            if progress is not None:
                progress.update(len(chunk))
    if size != entry["bytes"]:
        raise BundleError(f"{rel}: {size} bytes arrived, the manifest says {entry['bytes']}")
    if digest.hexdigest() != entry["sha256"]:
        raise BundleError(f"{rel}: sha256 does not match the manifest; refusing the bundle")
    log.debug("%s: %d bytes verified", rel, size)
    return size
