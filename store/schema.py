"""Schema versions of the store's databases and the migrations between them.

Each database (the example store, the registry) carries the version of its schema; on SQLite
in ``PRAGMA user_version``, on PostgreSQL in the ``aftertune_schema`` table (one row per
database, all in one PostgreSQL database). Opening a database brings an older schema up to date in one
transaction per step, and refuses a schema newer than this code knows (a newer aftertune
wrote it: running the older one against it could corrupt what the newer one relies on).

Version 0 is a file made before versions existed; its tables are brought to version 1 by
the ``CREATE ... IF NOT EXISTS`` schema and the one column added since. A migration is a
function of an open connection, written small rather than through Alembic: two tables
per database, a handful of steps, and SQLite's ALTER TABLE limits need hand-written table
rebuilds either way.
"""

from __future__ import annotations

import logging
import sqlite3
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from aftertune.store.errors import SchemaError

log = logging.getLogger(__name__)


class Dialect(str, Enum):
    """The engines the store runs on."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


def text_key(text: str) -> int:
    """The CRC-32 of ``text``: what the store indexes instead of long text.

    Keys collide (about one lookup in 400 at ten million rows fetches a second row), so every
    lookup by key compares the text as well. CRC-32 rather than a cryptographic hash because
    ingest computes two per record: it costs a third of blake2b's time here.
    """
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def prompt_key(task: str, instruction: str, input: str) -> int:
    """The key of a prompt (task, instruction, input): where contradicting labels are found."""
    return text_key(f"{task}\x1f{instruction}\x1f{input}")


@dataclass(frozen=True)
class Migration:
    """One step: ``to`` is the version it leaves the database at."""

    to: int
    what: str
    apply: Callable[[Any], None]  # given the open transaction (sqlite3 or psycopg)


@dataclass(frozen=True)
class SchemaPlan:
    """A database's schema on both engines: the current DDL, its version, the older ones' steps.

    PostgreSQL support began at ``postgres_since``: a PostgreSQL database is never older.
    """

    name: str
    version: int
    create: str  # the current SQLite schema, for a new file
    migrations: Sequence[Migration]  # SQLite's, from version 0 (a file from before versions)
    postgres_create: str = ""
    postgres_migrations: Sequence[Migration] = ()


def sqlite_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate_sqlite(db: sqlite3.Connection, plan: SchemaPlan, path: Path) -> list[str]:
    """Bring ``db`` to ``plan.version``; returns what was done. Refuses a newer schema."""
    db.create_function("aftertune_text_key", 1, text_key, deterministic=True)
    db.create_function("aftertune_prompt_key", 3, prompt_key, deterministic=True)
    version = sqlite_version(db)
    if version > plan.version:
        raise SchemaError(
            f"{path} has {plan.name} schema version {version}, newer than this aftertune "
            f"knows ({plan.version}); run the aftertune that wrote it, or a newer one"
        )
    if version == plan.version:
        return []
    # Every step checks again under the write lock: another process opening the same file
    # at the same moment (two daemons starting together) may have done it meanwhile.
    done: list[str] = []
    if version == 0 and not _has_tables(db):
        created: list[bool] = []
        _in_transaction(db, lambda c: created.append(_create_unless_there(c, plan)))
        if created[0]:
            return [f"created {plan.name} schema version {plan.version}"]
    for step in plan.migrations:
        if step.to <= version:
            continue
        applied: list[bool] = []
        _in_transaction(db, lambda c, s=step, a=applied: a.append(_apply_unless_done(c, s)))  # type: ignore[misc]
        if applied[0]:
            log.info("%s: %s schema version %d: %s", path, plan.name, step.to, step.what)
            done.append(f"{plan.name} schema version {step.to}: {step.what}")
    return done


def _create_unless_there(db: sqlite3.Connection, plan: SchemaPlan) -> bool:
    if sqlite_version(db) != 0 or _has_tables(db):
        return False
    _create(db, plan)
    return True


def _apply_unless_done(db: sqlite3.Connection, step: Migration) -> bool:
    if sqlite_version(db) >= step.to:
        return False
    _apply(db, step)
    return True


def _has_tables(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()
    return int(row[0]) > 0


def _create(db: sqlite3.Connection, plan: SchemaPlan) -> None:
    for statement in _statements(plan.create):
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {plan.version}")


def _apply(db: sqlite3.Connection, step: Migration) -> None:
    step.apply(db)
    db.execute(f"PRAGMA user_version = {step.to}")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def run_script(db: Any, script: str) -> None:
    """Execute ``;``-separated DDL inside the caller's transaction (executescript commits)."""
    for statement in _statements(script):
        db.execute(statement)


def _in_transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], None]) -> None:
    """One step, all or nothing: SQLite's DDL is transactional, and so is user_version."""
    db.execute("BEGIN IMMEDIATE")
    try:
        work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


POSTGRES_VERSIONS = """
CREATE TABLE IF NOT EXISTS aftertune_schema (
    name    TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)
"""


POSTGRES_SCHEMA_LOCK = zlib.crc32(b"aftertune:schema")


def migrate_postgres(tx: Any, plan: SchemaPlan, where: str) -> list[str]:
    """Bring ``plan.name``'s tables to ``plan.version`` inside the caller's (locked) transaction.

    The caller holds the database's write lock, so two daemons starting together migrate once;
    one more lock, shared by every database of the store, keeps two of them from creating
    ``aftertune_schema`` at once (concurrent CREATE TABLE IF NOT EXISTS can fail).
    """
    tx.execute("SELECT pg_advisory_xact_lock(?)", (POSTGRES_SCHEMA_LOCK,))
    tx.execute(POSTGRES_VERSIONS)
    row = tx.execute("SELECT version FROM aftertune_schema WHERE name = ?", (plan.name,)).fetchone()
    if row is None:
        run_script(tx, plan.postgres_create)
        tx.execute(
            "INSERT INTO aftertune_schema (name, version) VALUES (?, ?)", (plan.name, plan.version)
        )
        return [f"created {plan.name} schema version {plan.version}"]
    version = int(row[0])
    if version > plan.version:
        raise SchemaError(
            f"{where} has {plan.name} schema version {version}, newer than this aftertune "
            f"knows ({plan.version}); run the aftertune that wrote it, or a newer one"
        )
    done: list[str] = []
    for step in plan.postgres_migrations:
        if step.to > version:
            step.apply(tx)
            tx.execute(
                "UPDATE aftertune_schema SET version = ? WHERE name = ?", (step.to, plan.name)
            )
            done.append(f"{plan.name} schema version {step.to}: {step.what}")
    return done
