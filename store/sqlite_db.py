"""How the store opens its SQLite files and writes to them: one place for the durability rules."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from aftertune.store.errors import StorageError
from aftertune.store.schema import Dialect, SchemaPlan, migrate_sqlite

# SQLite's primary result codes that mean "the disk, not the data": a full or failing disk,
# a file that cannot be opened or written. Extended codes (SQLITE_IOERR_WRITE, ...) carry
# the primary code in their low byte.
_STORAGE_CODES = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_PERM,
    }
)
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def is_storage_error(exc: BaseException) -> bool:
    """True when ``exc`` is the disk failing us (full, I/O, read-only), not a bug or bad data."""
    if isinstance(exc, StorageError):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF) in _STORAGE_CODES
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


def open_failure(path: Path, exc: BaseException) -> StorageError:
    """One line for a store that cannot be opened: the path and the permission it needs."""
    where = path.parent
    cause = str(exc) if where.is_dir() else f"{where} is not a directory and cannot be made one"
    return StorageError(
        path,
        cause,
        f"the daemon needs read, write and search (rwx) permission on {where} "
        "and read-write on the files in it",
    )


class SQLiteDatabase:
    """One SQLite file of the store (store/database.py's Database, embedded)."""

    dialect = Dialect.SQLITE

    def __init__(self, path: Path, plan: SchemaPlan) -> None:
        self.path = path
        self.where = str(path)
        self._lock = threading.RLock()
        self.connection, self.migrated = connect(path, plan)

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.connection, self._lock, self.path)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self.connection.execute(sql, tuple(params)).fetchall()

    def iterate(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Any]:
        with self._lock:
            yield from self.connection.execute(sql, tuple(params))

    def close(self) -> None:
        with self._lock:
            self.connection.close()


BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another's lock


def _wal(db: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``. On a new file that another process is converting at the
    same moment, SQLite answers 'database is locked' at once, without its busy handler (seen
    about once in 60 starts of six openers together), so it is tried again until the busy
    timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect(path: Path, plan: SchemaPlan) -> tuple[sqlite3.Connection, list[str]]:
    """A connection shared by the threads of one process (callers hold their own lock).

    Returns the connection and what was migrated. WAL so readers never block the writer; synchronous=FULL so a commit survives power loss,
    not just a crash (ingest acknowledges stream entries only after it). The schema is
    brought to ``plan``'s version (store/schema.py); a newer one raises SchemaError. A
    64 MiB page cache keeps the indexes a batch touches in memory. A file that cannot be
    opened or written raises StorageError naming it.
    """
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _wal(db)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA cache_size=-65536")
        migrated = migrate_sqlite(db, plan, path)
    except (sqlite3.Error, OSError) as exc:
        if is_storage_error(exc):
            raise open_failure(path, exc) from exc
        raise
    return db, migrated


@contextmanager
def transaction(
    db: sqlite3.Connection, lock: threading.RLock, path: Path | None = None
) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception (or a kill: SQLite's journal).

    A full or failing disk raises StorageError with SQLite's own words: SQLite may already
    have rolled the transaction back itself, and a second ROLLBACK ("no transaction is
    active") must not hide the cause.
    """
    with lock:
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        except (sqlite3.Error, OSError) as exc:
            if is_storage_error(exc) and not isinstance(exc, StorageError):
                where = path if path is not None else _db_path(db)
                raise StorageError(where, str(exc)) from exc
            raise


def _rollback(db: sqlite3.Connection) -> None:
    if not db.in_transaction:
        return  # SQLite rolled back already (SQLITE_FULL, SQLITE_IOERR, ...)
    # The error being raised says more than a failed ROLLBACK would; the journal undoes the rest.
    with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")


def _db_path(db: sqlite3.Connection) -> str:
    try:
        rows = db.execute("PRAGMA database_list").fetchall()
    except sqlite3.Error:
        return "the database"
    return next((str(file) for _, name, file in rows if name == "main" and file), "the database")
