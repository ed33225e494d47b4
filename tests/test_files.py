"""Durable files: the multi-file fingerprint and a directory that appears whole or not at all."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aftertune.store.files import file_sha256, files_sha256, staged_dir


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000  # over one 1 MiB read
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_files_sha256_covers_names_bytes_and_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    # The lineage fingerprints stored in registries depend on this exact scheme.
    expected = hashlib.sha256(b"a.safetensors\0first" + b"b.safetensors\0second").hexdigest()
    assert files_sha256([a, b]) == expected
    assert files_sha256([b, a]) != expected
    renamed = tmp_path / "c.safetensors"
    a.rename(renamed)
    assert files_sha256([renamed, b]) != expected


def test_staged_dir_replaces_the_directory_whole(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # readers still see the old one meanwhile
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left


def test_staged_dir_leaves_the_old_directory_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), staged_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("half-way")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
