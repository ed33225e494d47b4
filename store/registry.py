"""The model registry: numbered versions, their lifecycle state, lineage and audit log.

A version is one trained LoRA adapter (PEFT format under ``adapters/v<N>/``) plus what it
was trained on. ``parent`` is the champion it was trained on (None = the base model), so
a version's adapter chain is its parent's chain plus itself. The ``champion`` alias names
the version serving now (none = the base model). Every state change is appended to the
audit log in the same transaction as the change.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from aftertune.store.errors import RegistryError
from aftertune.store.failpoints import failpoint
from aftertune.store.layout import StateLayout
from aftertune.store.schema import Migration, SchemaPlan, run_script
from aftertune.store.sqlite_db import connect, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version     INTEGER PRIMARY KEY,
    state       TEXT    NOT NULL,
    parent      INTEGER,
    data_seq    INTEGER NOT NULL,
    created_at  REAL    NOT NULL,
    updated_at  REAL    NOT NULL,
    training    TEXT    NOT NULL,
    lineage     TEXT    NOT NULL,
    metrics     TEXT    NOT NULL DEFAULT '{}',
    gate        TEXT    NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS aliases (
    name    TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL    NOT NULL,
    version    INTEGER NOT NULL,
    from_state TEXT,
    to_state   TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    reason     TEXT    NOT NULL
);
"""


SCHEMA_PLAN = SchemaPlan(
    name="registry",
    version=1,
    create=SCHEMA,
    migrations=(Migration(1, "versioned", lambda db: run_script(db, SCHEMA)),),
)


class VersionState(str, Enum):
    CANDIDATE = "candidate"
    EVALUATING = "evaluating"
    AWAITING_APPROVAL = "awaiting_approval"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    RETIRED = "retired"


# Which state may follow which. RETIRED -> PROMOTED is a rollback.
TRANSITIONS: dict[VersionState, frozenset[VersionState]] = {
    VersionState.CANDIDATE: frozenset({VersionState.EVALUATING, VersionState.REJECTED}),
    VersionState.EVALUATING: frozenset(
        {VersionState.PROMOTED, VersionState.REJECTED, VersionState.AWAITING_APPROVAL}
    ),
    VersionState.AWAITING_APPROVAL: frozenset({VersionState.PROMOTED, VersionState.REJECTED}),
    VersionState.PROMOTED: frozenset({VersionState.RETIRED}),
    VersionState.RETIRED: frozenset({VersionState.PROMOTED}),
    VersionState.REJECTED: frozenset(),
}


@dataclass(frozen=True)
class Version:
    version: int
    state: VersionState
    parent: int | None
    data_seq: int  # highest example seq this version's training could see
    created_at: float
    updated_at: float
    adapter_dir: Path
    training: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEntry:
    at: float
    version: int
    from_state: str | None
    to_state: str
    actor: str
    reason: str


class Registry:
    """SQLite-backed registry in ``state_dir``; adapters live in ``state_dir/adapters``."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.adapters_dir = StateLayout(self.state_dir).adapters
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = connect(StateLayout(self.state_dir).registry_db, SCHEMA_PLAN)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    def adapter_dir(self, version: int) -> Path:
        return self.adapters_dir / f"v{version}"

    def register_candidate(
        self,
        adapter_src: Path,
        *,
        parent: int | None,
        data_seq: int,
        training: dict[str, Any],
        lineage: dict[str, Any],
        actor: str = "daemon",
    ) -> Version:
        """Move a trained adapter directory in as the next version, state ``candidate``."""
        if not (adapter_src / "adapter_config.json").exists():
            raise RegistryError(f"{adapter_src} is not a PEFT adapter (no adapter_config.json)")
        now = time.time()
        with self._transaction() as db:
            (latest,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()
            version = int(latest) + 1
            target = self.adapter_dir(version)
            if target.exists():  # left by a crash between the move and the commit
                shutil.rmtree(target)
            os.replace(adapter_src, target)
            db.execute(
                "INSERT INTO versions (version, state, parent, data_seq, created_at, updated_at,"
                " training, lineage) VALUES (?,?,?,?,?,?,?,?)",
                (
                    version,
                    VersionState.CANDIDATE.value,
                    parent,
                    data_seq,
                    now,
                    now,
                    json.dumps(training, sort_keys=True),
                    json.dumps(lineage, sort_keys=True),
                ),
            )
            self._audit(db, version, None, VersionState.CANDIDATE, actor, "trained")
        return self.get(version)

    def _audit(
        self,
        db: sqlite3.Connection,
        version: int,
        from_state: VersionState | None,
        to_state: VersionState,
        actor: str,
        reason: str,
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, version, from_state, to_state, actor, reason)"
            " VALUES (?,?,?,?,?,?)",
            (
                time.time(),
                version,
                from_state.value if from_state else None,
                to_state.value,
                actor,
                reason,
            ),
        )

    def _row(self, row: tuple[Any, ...]) -> Version:
        version, state, parent, data_seq, created, updated, training, lineage, metrics, gate = row
        return Version(
            version=version,
            state=VersionState(state),
            parent=parent,
            data_seq=data_seq,
            created_at=created,
            updated_at=updated,
            adapter_dir=self.adapter_dir(version),
            training=json.loads(training),
            lineage=json.loads(lineage),
            metrics=json.loads(metrics),
            gate=json.loads(gate),
        )

    _SELECT = (
        "SELECT version, state, parent, data_seq, created_at, updated_at, training, lineage,"
        " metrics, gate FROM versions"
    )

    def get(self, version: int) -> Version:
        with self._lock:
            row = self._db.execute(self._SELECT + " WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise RegistryError(f"no model version {version}; `aftertune models` lists them")
        return self._row(row)

    def versions(self) -> list[Version]:
        with self._lock:
            rows = self._db.execute(self._SELECT + " ORDER BY version").fetchall()
        return [self._row(r) for r in rows]

    def champion(self) -> Version | None:
        """The version behind the ``champion`` alias; None while the base model serves."""
        with self._lock:
            row = self._db.execute("SELECT version FROM aliases WHERE name = 'champion'").fetchone()
        return self.get(int(row[0])) if row else None

    def chain(self, version: int | None) -> list[Version]:
        """Adapters to merge onto the base, oldest first, to rebuild ``version``."""
        out: list[Version] = []
        seen: set[int] = set()
        while version is not None:
            if version in seen:
                raise RegistryError(f"lineage of version {version} has a cycle")
            seen.add(version)
            current = self.get(version)
            out.append(current)
            version = current.parent
        return list(reversed(out))

    def _state(self, db: sqlite3.Connection, version: int) -> VersionState:
        row = db.execute("SELECT state FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise RegistryError(f"no model version {version}; `aftertune models` lists them")
        return VersionState(row[0])

    def _move(
        self,
        db: sqlite3.Connection,
        version: int,
        to: VersionState,
        actor: str,
        reason: str,
        *,
        gate: dict[str, Any] | None = None,
    ) -> None:
        current = self._state(db, version)
        if to not in TRANSITIONS[current]:
            allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none"
            raise RegistryError(
                f"version {version} is {current.value}; it cannot become {to.value} "
                f"(allowed from {current.value}: {allowed})"
            )
        sql = "UPDATE versions SET state = ?, updated_at = ?"
        params: list[Any] = [to.value, time.time()]
        if gate is not None:
            sql += ", gate = ?"
            params.append(json.dumps(gate, sort_keys=True))
        db.execute(sql + " WHERE version = ?", (*params, version))
        self._audit(db, version, current, to, actor, reason)

    def transition(
        self,
        version: int,
        to: VersionState,
        *,
        actor: str,
        reason: str,
        gate: dict[str, Any] | None = None,
    ) -> Version:
        """Move ``version`` to state ``to`` (not PROMOTED: use promote or rollback)."""
        if to is VersionState.PROMOTED:
            raise RegistryError("use promote() or rollback() to make a version champion")
        with self._transaction() as db:
            self._move(db, version, to, actor, reason, gate=gate)
        return self.get(version)

    def promote(
        self, version: int, *, actor: str, reason: str, gate: dict[str, Any] | None = None
    ) -> Version:
        """Make ``version`` the champion; the old champion retires. One transaction."""
        with self._transaction() as db:
            self._move(db, version, VersionState.PROMOTED, actor, reason, gate=gate)
            failpoint("registry.promote")  # mid-transaction: SQLite must roll it all back
            self._switch_champion(db, version, actor, f"superseded by v{version}")
        return self.get(version)

    def rollback(self, version: int, *, actor: str, reason: str = "") -> Version:
        """Move the champion alias back to ``version``, a retired former champion."""
        with self._transaction() as db:
            state = self._state(db, version)
            if state is not VersionState.RETIRED:
                raise RegistryError(
                    f"version {version} is {state.value}; only a retired former champion "
                    "can be rolled back to"
                )
            why = reason or f"rollback to v{version}"
            self._move(db, version, VersionState.PROMOTED, actor, why)
            self._switch_champion(db, version, actor, f"rolled back to v{version}")
        return self.get(version)

    def _switch_champion(self, db: sqlite3.Connection, version: int, actor: str, why: str) -> None:
        row = db.execute("SELECT version FROM aliases WHERE name = 'champion'").fetchone()
        if row is not None and int(row[0]) != version:
            self._move(db, int(row[0]), VersionState.RETIRED, actor, why)
        db.execute(
            "INSERT INTO aliases (name, version) VALUES ('champion', ?)"
            " ON CONFLICT(name) DO UPDATE SET version = excluded.version",
            (version,),
        )

    def in_state(self, state: VersionState) -> list[Version]:
        with self._lock:
            rows = self._db.execute(
                self._SELECT + " WHERE state = ? ORDER BY version", (state.value,)
            ).fetchall()
        return [self._row(r) for r in rows]

    def promoted_at(self, version: int) -> float | None:
        """When ``version`` last became champion (None if it never did)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(at) FROM audit WHERE version = ? AND to_state = ?",
                (version, VersionState.PROMOTED.value),
            ).fetchone()
        return row[0] if row else None

    def set_metrics(self, version: int, metrics: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE versions SET metrics = ?, updated_at = ? WHERE version = ?",
                (json.dumps(metrics, sort_keys=True), time.time(), version),
            )

    def audit_log(self, version: int | None = None) -> list[AuditEntry]:
        sql = "SELECT at, version, from_state, to_state, actor, reason FROM audit"
        params: tuple[int, ...] = ()
        if version is not None:
            sql, params = sql + " WHERE version = ?", (version,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", params).fetchall()
        return [AuditEntry(*r) for r in rows]
