"""Which published bundles are whole, known without hashing a file on every request.

A file's verdict (its bytes match the manifest's size and sha256) is remembered under the
file's identity on disk: (inode, size, mtime, ctime). Any write or ``touch`` changes ctime,
so a file changed after its verdict is hashed again before it is served. Bit rot changes
nothing of the kind, so ``sweep(rehash=True)`` hashes every file again (the daemon does at
start and then daily, ``daemon/bundle_watch.py``).

A bundle that fails is **taken out of service**: its directory is renamed to
``bundles/.damaged-vN`` (kept for inspection; never listed, served or pulled), ``latest`` is
removed if it pointed there, and the failure is logged once and reported to ``on_damaged``
(the daemon counts it and asks for a repair: ``learners/promote.py::sync_latest`` exports
the champion's bundle again from its adapters).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aftertune.store.bundles import LATEST, latest_version, published_versions
from aftertune.store.consumer.format import (
    manifest_sha256,
    read_manifest,
    resolve_inside,
    verify_bundle,
    verify_file,
    version_dir_name,
)
from aftertune.store.errors import BundleError
from aftertune.store.files import fsync_dir

log = logging.getLogger(__name__)

DAMAGED_PREFIX = ".damaged-"
# A verdict is kept only for a file last changed this long before it was hashed (see
# ``_remember``); coarse filesystem clocks tick every few milliseconds.
RACY_NS = 1_000_000_000

# (inode, size, mtime_ns, ctime_ns, expected sha256) of a file that verified.
_Identity = tuple[int, int, int, int, str]


class BundleAudit:
    """Verdicts on published files, shared by the HTTP server and the daemon's sweeps."""

    def __init__(
        self, bundles_dir: Path, on_damaged: Callable[[int, str], None] | None = None
    ) -> None:
        self.bundles_dir = Path(bundles_dir)
        self._on_damaged = on_damaged
        self._verified: dict[str, _Identity] = {}
        self._lock = threading.Lock()  # the cache, and one take-out at a time

    def verified_file(
        self, version: int, bundle_dir: Path, manifest_sha: str, rel: str, entry: Mapping[str, Any]
    ) -> Path:
        """The real path of a listed file whose bytes match ``entry``; hashed only when its
        identity on disk changed. A mismatch takes the bundle (the one whose manifest has
        ``manifest_sha``) out of service: BundleError."""
        try:
            return self._checked(bundle_dir, rel, entry)
        except BundleError as exc:
            self.take_out_of_service(version, manifest_sha, str(exc))
            raise

    def _checked(self, bundle_dir: Path, rel: str, entry: Mapping[str, Any]) -> Path:
        real = resolve_inside(bundle_dir, rel)
        try:
            identity = _identity(real, entry)
        except FileNotFoundError:
            raise BundleError(f"{rel}: missing from the bundle") from None
        with self._lock:
            if self._verified.get(str(real)) == identity:
                return real
        started = time.time_ns()
        verify_file(real, rel, entry)
        self._remember(real, identity, started)
        return real

    def _remember(self, real: Path, identity: _Identity, started_ns: int) -> None:
        """Keep a verdict unless the file changed too shortly before it was hashed: within a
        tick of the filesystem's coarse clock a later write can leave (mtime, ctime) as they
        were ("racy git"); such a file is hashed again next time."""
        if identity[3] < started_ns - RACY_NS:
            with self._lock:
                self._verified[str(real)] = identity

    def sweep(self, rehash: bool = False) -> dict[int, str]:
        """Check every published bundle (``rehash``: hash even files that kept their identity);
        take those that fail out of service. Returns {version: why} of those taken out."""
        failed: dict[int, str] = {}
        for version in published_versions(self.bundles_dir):
            bundle_dir = self.bundles_dir / version_dir_name(version)
            manifest_sha = _manifest_sha(bundle_dir)
            if manifest_sha is None:
                continue  # pruned meanwhile
            try:
                if rehash:
                    self._rehash(bundle_dir)
                else:
                    manifest = read_manifest(bundle_dir)
                    for rel, entry in manifest["files"].items():
                        self._checked(bundle_dir, rel, entry)
            except (BundleError, OSError) as exc:
                if self.take_out_of_service(version, manifest_sha, str(exc)):
                    failed[version] = str(exc)
        return failed

    def _rehash(self, bundle_dir: Path) -> None:
        started = time.time_ns()
        manifest = read_manifest(bundle_dir)
        identities = {
            resolve_inside(bundle_dir, rel): _identity(resolve_inside(bundle_dir, rel), entry)
            for rel, entry in manifest["files"].items()
        }
        verify_bundle(bundle_dir)
        for real, identity in identities.items():
            self._remember(real, identity, started)

    def take_out_of_service(self, version: int, manifest_sha: str, reason: str) -> bool:
        """Rename ``vN`` to ``.damaged-vN``, drop ``latest`` if it named it, log, report.

        False when ``vN`` is gone already (another thread took it out, or it was pruned) or
        holds another manifest than the one that failed (it was exported again meanwhile).
        """
        bundles = self.bundles_dir
        with self._lock:
            bundle_dir = bundles / version_dir_name(version)
            if bundle_dir.is_symlink() or _manifest_sha(bundle_dir) != manifest_sha:
                return False
            aside = bundles / f"{DAMAGED_PREFIX}{version_dir_name(version)}"
            shutil.rmtree(aside, ignore_errors=True)  # an older damaged copy of the same
            os.replace(bundle_dir, aside)
            if latest_version(bundles) == version:
                (bundles / LATEST).unlink(missing_ok=True)
            fsync_dir(bundles)
            self._verified = {
                path: identity
                for path, identity in self._verified.items()
                if not Path(path).is_relative_to(bundle_dir.resolve())
            }
        log.error(
            "bundle v%d is damaged and out of service (moved to %s): %s", version, aside, reason
        )
        if self._on_damaged is not None:
            self._on_damaged(version, reason)
        return True


def _identity(real: Path, entry: Mapping[str, Any]) -> _Identity:
    st = os.stat(real)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, str(entry["sha256"]))


def _manifest_sha(bundle_dir: Path) -> str | None:
    """The sha256 of ``bundle_dir``'s manifest; None if it has none."""
    try:
        return manifest_sha256(bundle_dir)
    except OSError:
        return None
