"""Durable files: atomic writes, directory swaps, fsync, and the sha256 of a file.

Every write the store, the learners and the daemon make to disk goes through here: temp file
or temp directory, fsync, ``os.replace``, fsync of the directory holding it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from aftertune.store.failpoints import failpoint


def _feed(digest: hashlib._Hash, path: Path) -> None:
    """Add a file's bytes to a hashlib digest, read in 1 MiB chunks."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    _feed(digest, path)
    return digest.hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    """Hex sha256 over several files in the given order: each file's name, a NUL, its bytes.

    The name goes in too, so renaming or splitting files changes the fingerprint.
    """
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode("utf-8") + b"\0")
        _feed(digest, path)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """temp file, fsync, os.replace, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and the directories holding them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` is swapped out, then removed."""
    old: Path | None = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        failpoint("replace_dir.swapped_out")  # the moment ``dst`` does not exist
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path, prefix: str | None = None) -> Iterator[Path]:
    """A temp directory beside ``final`` to fill; on a clean exit it is fsynced and swapped in.

    Its name starts with ``prefix`` (default ``.<final's name>.``).

    On an exception the temp directory is removed and ``final`` stays as it was, so readers
    never see a half-written directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
