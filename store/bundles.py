"""Publication of bundles under ``state_dir/bundles``: staging, install, ``latest``, pruning.

    bundles/
      v3/                 one published bundle, never modified after its rename
      latest -> v3        symlink, swapped with one rename
      .staging-v4-*/      an export in progress: never served, removed at start-up
      .damaged-v2/        a bundle that failed verification, out of service (bundle_audit.py)

A version directory appears only by renaming a verified staging directory, and ``latest``
moves only by renaming a new symlink over it, so a reader sees a whole bundle or none.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aftertune.store.consumer.format import (
    MANIFEST,
    manifest_sha256,
    parse_version,
    read_manifest,
    verify_bundle,
    version_dir_name,
)
from aftertune.store.errors import BundleError
from aftertune.store.files import fsync_dir

LATEST = "latest"
STAGING_PREFIX = ".staging-"
_VERSION_DIR = re.compile(r"^v(\d+)$")
_PID_SUFFIX = re.compile(r"-(\d+)$")


def published_versions(bundles_dir: Path) -> list[int]:
    """Versions with a bundle directory under ``bundles_dir``, ascending."""
    if not Path(bundles_dir).is_dir():
        return []
    found = []
    for entry in Path(bundles_dir).iterdir():
        m = _VERSION_DIR.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and (entry / MANIFEST).is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def latest_version(bundles_dir: Path) -> int | None:
    link = Path(bundles_dir) / LATEST
    try:
        target = os.readlink(link)
    except (FileNotFoundError, OSError):
        return None
    m = _VERSION_DIR.match(target)
    return int(m.group(1)) if m else None


def point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` with one rename: readers see old or new."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def new_staging_dir(bundles_dir: Path, version: int) -> Path:
    bundles_dir.mkdir(parents=True, exist_ok=True)
    staging = bundles_dir / f"{STAGING_PREFIX}{version_dir_name(version)}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def clean_staging(bundles_dir: Path, *, at_start: bool = False) -> list[str]:
    """Remove what interrupted exports and pulls left behind. Returns the names removed.

    A staging dir is named after the process that fills it: one of another live process (an
    ``aftertune cycle`` exporting beside the daemon) is left alone, and so is one of this
    process unless ``at_start`` (nothing of ours runs yet: a dir with our pid is a dead
    namesake's, as in a container where every start is pid 1).
    """
    removed = []
    if Path(bundles_dir).is_dir():
        for entry in Path(bundles_dir).iterdir():
            if entry.name.startswith(STAGING_PREFIX) or ".tmp-" in entry.name:
                if _owner_running(entry.name, at_start):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return removed


def _owner_running(name: str, at_start: bool) -> bool:
    """The process whose pid ends ``name`` is alive (and, at start, not this one)."""
    m = _PID_SUFFIX.search(name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return not at_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OverflowError:
        return False
    return True


def install(staging: Path, bundles_dir: Path, version: int) -> Path:
    """Rename a verified staging directory to ``v<version>`` (kept if already whole there)."""
    verify_bundle(staging)
    final = Path(bundles_dir) / version_dir_name(version)
    if final.exists():
        try:
            verify_bundle(final)
            shutil.rmtree(staging)
            return final
        except BundleError:
            shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def set_latest(bundles_dir: Path, version: int) -> None:
    if not (Path(bundles_dir) / version_dir_name(version) / MANIFEST).is_file():
        raise BundleError(f"no published bundle v{version} under {bundles_dir}")
    point(Path(bundles_dir) / LATEST, version_dir_name(version))


def prune(bundles_dir: Path, keep: int, protect: set[int] | None = None) -> list[int]:
    """Delete the oldest bundles beyond ``keep``; never latest or ``protect``."""
    latest = latest_version(bundles_dir)
    guarded = (protect or set()) | ({latest} if latest is not None else set())
    versions = published_versions(bundles_dir)
    removed = []
    for version in versions[: max(0, len(versions) - keep)]:
        if version not in guarded:
            # Renamed first, so no reader (server, audit, pull --from) sees it half deleted.
            doomed = Path(bundles_dir) / f".tmp-pruned-{version_dir_name(version)}-{os.getpid()}"
            os.replace(Path(bundles_dir) / version_dir_name(version), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(version)
    return removed


@dataclass(frozen=True)
class Published:
    """One published bundle as a server or a pull source sees it."""

    version: int
    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str


def published(bundles_dir: Path, version: int | str) -> Published:
    """The published bundle ``version`` ('latest', 3 or 'v3'), its manifest read and checked."""
    if version == LATEST:
        found = latest_version(bundles_dir)
        if found is None:
            raise BundleError(f"nothing published yet under {bundles_dir}")
        version = found
    number = parse_version(version)
    path = Path(bundles_dir) / version_dir_name(number)
    manifest = read_manifest(path)
    return Published(number, path, manifest, manifest_sha256(path))
