"""The store under a failing disk, a reused record id and an unusable directory.

"Full" is SQLite's own: ``PRAGMA max_page_count`` makes the database refuse to grow with
SQLITE_FULL, the same code and message a full filesystem gives (no mock).
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from aftertune.store.errors import StorageError
from aftertune.store.examples import Added, ExampleStore
from aftertune.store.records import Record, record_from_obj
from aftertune.store.sqlite_db import is_storage_error


def _record(i: int, **extra: object) -> Record:
    row = {"task": "t", "instruction": "Echo.", "input": f"x{i}" * 50, "output": str(i)}
    return record_from_obj({**row, **extra})


def _fill_up(store: ExampleStore) -> None:
    """Leave the database one page short of its cap (max_page_count)."""
    pages = store.db.connection.execute("PRAGMA page_count").fetchone()[0]
    store.db.connection.execute(f"PRAGMA max_page_count = {pages + 1}")


def test_full_disk_raises_storage_error_with_sqlites_words(tmp_path: Path) -> None:
    with ExampleStore.in_state_dir(tmp_path) as store:
        store.add([_record(i) for i in range(5)])
        _fill_up(store)
        with pytest.raises(StorageError) as caught:
            store.add([_record(i) for i in range(100, 400)])
        message = str(caught.value)
        assert "database or disk is full" in message
        assert "no transaction is active" not in message
        assert str(store.path) in message
        assert store.total() == 5  # nothing half-written
        # Space returns: the same connection writes again, the failed batch in full.
        store.db.connection.execute("PRAGMA max_page_count = 1073741823")
        assert store.add([_record(i) for i in range(100, 400)]).stored == 300
        assert store.total() == 305


def test_storage_errors_are_told_from_others() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert is_storage_error(full)
    assert is_storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_storage_error(sqlite3.OperationalError("no such table: x"))
    assert not is_storage_error(ValueError("bad"))


def test_reused_id_with_other_content_is_a_conflict_not_a_duplicate(tmp_path: Path) -> None:
    with ExampleStore.in_state_dir(tmp_path) as store:
        first = _record(1, id="r-1")
        assert store.add([first]) == Added(stored=1, duplicates=0)
        other = _record(2, id="r-1")  # same id, another example
        same = _record(1, id="r-1", source="retry")  # a redelivery (source is not content)
        heavier = _record(1, id="r-1", weight=2.0)
        assert store.add([same, other, heavier, _record(3)]) == Added(1, 1, (1, 2))
        assert [e.output for e in store.get(["r-1"])] == ["1"]  # the first one stays


def test_conflict_inside_one_batch(tmp_path: Path) -> None:
    with ExampleStore.in_state_dir(tmp_path) as store:
        batch = [_record(1, id="dup"), _record(1, id="dup"), _record(2, id="dup")]
        assert store.add(batch) == Added(stored=1, duplicates=1, conflicts=(2,))


def test_a_state_dir_under_a_file_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError) as caught:
        ExampleStore.in_state_dir(tmp_path / "file" / "state")
    message = str(caught.value)
    assert str(tmp_path / "file" / "state") in message
    assert "permission" in message
    assert "\n" not in message
