"""The example store: every accepted feedback record, durable in SQLite (WAL mode).

Idempotent on record id, so at-least-once delivery from the stream gives exactly-once
effects. An id that comes back with other content (task, instruction, input, output, split
or weight) is not a redelivery but a conflict: ``add`` stores nothing for it and says so, and
ingest dead-letters it ("id reused with different content"). ``seq`` is a monotonic insertion counter: a model version remembers the highest
``seq`` it has seen, and "new data since the champion" is every train example above it.

A batch whose challenger the gate rejected is *quarantined* (``quarantined_by`` = that
version): kept for inspection, but no later cycle trains, replays or evaluates on it, so
one poisoned batch cannot keep failing every cycle after it.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from aftertune.store.layout import StateLayout
from aftertune.store.records import Record
from aftertune.store.sqlite_db import connect, open_failure, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,
    task        TEXT    NOT NULL,
    instruction TEXT    NOT NULL,
    input       TEXT    NOT NULL,
    output      TEXT    NOT NULL,
    split       TEXT    NOT NULL CHECK (split IN ('train', 'test')),
    pinned      INTEGER NOT NULL,
    weight      REAL    NOT NULL,
    source      TEXT    NOT NULL,
    meta        TEXT    NOT NULL,
    added_at    REAL    NOT NULL,
    quarantined_by INTEGER
);
CREATE INDEX IF NOT EXISTS examples_split_task ON examples (split, task, seq);
CREATE INDEX IF NOT EXISTS examples_task_input ON examples (task, input);
"""

_LIVE = " AND quarantined_by IS NULL"
_COLUMNS = (
    "seq, id, task, instruction, input, output, split, pinned, weight, source, meta, added_at"
)


@dataclass(frozen=True)
class Example:
    """One stored record, as the learner sees it."""

    seq: int
    id: str
    task: str
    instruction: str
    input: str
    output: str
    split: str
    pinned: bool = False
    weight: float = 1.0
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    added_at: float = 0.0


class Added(NamedTuple):
    """What ``ExampleStore.add`` did with a batch of records."""

    stored: int  # new records, now committed
    duplicates: int  # ids already stored with the same content (a redelivery): skipped
    conflicts: tuple[int, ...] = ()  # positions in the batch of ids reused with other content


# What a record's content is, for telling a redelivery from a reused id: the columns that
# change what is learned or how it is judged. source and meta may differ (first one kept).
_CONTENT = "id, task, instruction, input, output, split, weight"


def _content(record: Record) -> tuple[Any, ...]:
    return (
        record.id,
        record.task,
        record.instruction,
        record.input,
        record.output,
        record.split.value,
        record.weight,
    )


def _rows(records: Sequence[Record], now: float) -> list[tuple[Any, ...]]:
    return [
        (
            r.id,
            r.task,
            r.instruction,
            r.input,
            r.output,
            r.split.value,
            int(r.pinned),
            r.weight,
            r.source,
            json.dumps(r.meta, ensure_ascii=False, sort_keys=True) if r.meta else "{}",
            now,
        )
        for r in records
    ]


def _example(row: sqlite3.Row | tuple[Any, ...]) -> Example:
    seq, id_, task, instr, inp, out, split, pinned, weight, source, meta, added = row
    return Example(
        seq=seq,
        id=id_,
        task=task,
        instruction=instr,
        input=inp,
        output=out,
        split=split,
        pinned=bool(pinned),
        weight=weight,
        source=source,
        meta=json.loads(meta),
        added_at=added,
    )


class ExampleStore:
    """SQLite-backed store of examples; safe to share between threads of one process."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise open_failure(self.path, exc) from exc
        self._lock = threading.RLock()
        self._db = connect(self.path, SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(examples)")}
        if "quarantined_by" not in columns:  # a store made before quarantine existed
            self._db.execute("ALTER TABLE examples ADD COLUMN quarantined_by INTEGER")

    @classmethod
    def in_state_dir(cls, state_dir: Path | str) -> ExampleStore:
        return cls(StateLayout(state_dir).examples_db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock, self.path)

    def add(self, records: Sequence[Record]) -> Added:
        """Insert records in one transaction; duplicates are skipped, reused ids refused.

        A record whose id is already stored (or came earlier in ``records``) with the same
        content is a duplicate; with other content it is a conflict and is not stored.
        Raises StorageError when the disk refuses the write (nothing is stored then).
        """
        if not records:
            return Added(0, 0)
        with self._transaction() as db:
            known = self._stored_content(db, [r.id for r in records])
            new: list[Record] = []
            duplicates, conflicts = 0, []
            for position, record in enumerate(records):
                content = _content(record)
                seen = known.get(record.id)
                if seen is None:
                    known[record.id] = content
                    new.append(record)
                elif seen == content:
                    duplicates += 1
                else:
                    conflicts.append(position)
            db.executemany(
                "INSERT INTO examples (id, task, instruction, input, output, split,"
                " pinned, weight, source, meta, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                _rows(new, time.time()),
            )
        return Added(len(new), duplicates, tuple(conflicts))

    @staticmethod
    def _stored_content(db: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        found: dict[str, tuple[Any, ...]] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in db.execute(f"SELECT {_CONTENT} FROM examples WHERE id IN ({marks})", chunk):
                found[row[0]] = tuple(row)
        return found

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def counts(self) -> dict[str, dict[str, int]]:
        """{task: {"train": n, "test": n}} for every task with at least one example."""
        out: dict[str, dict[str, int]] = {}
        for task, split, n in self._query(
            "SELECT task, split, COUNT(*) FROM examples GROUP BY task, split ORDER BY task"
        ):
            out.setdefault(task, {"train": 0, "test": 0})[split] = n
        return out

    def total(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM examples")[0][0])

    def max_seq(self) -> int:
        """The highest seq stored so far (0 when empty): a watermark for "data seen"."""
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM examples")[0][0])

    def tasks(self, max_seq: int | None = None) -> list[str]:
        sql = "SELECT DISTINCT task FROM examples"
        params: tuple[int, ...] = ()
        if max_seq is not None:
            sql, params = sql + " WHERE seq <= ?", (max_seq,)
        return [t for (t,) in self._query(sql + " ORDER BY task", params)]

    def count_train_after(self, seq: int) -> int:
        """How many train examples arrived after watermark ``seq``."""
        rows = self._query(
            "SELECT COUNT(*) FROM examples WHERE split='train' AND seq > ?" + _LIVE, (seq,)
        )
        return int(rows[0][0])

    def train_after(self, seq: int, until: int | None = None) -> list[Example]:
        """Train examples with ``seq < x.seq <= until`` in arrival order (new data for a cycle)."""
        until = self.max_seq() if until is None else until
        rows = self._query(
            f"SELECT {_COLUMNS} FROM examples WHERE split='train' AND seq > ? AND seq <= ?"
            + _LIVE
            + " ORDER BY seq",
            (seq, until),
        )
        return [_example(r) for r in rows]

    def held_out(
        self, task: str | None = None, after: int = 0, until: int | None = None
    ) -> list[Example]:
        """Test examples (optionally of one task) with ``after < seq <= until``, in seq order."""
        sql = f"SELECT {_COLUMNS} FROM examples WHERE split='test' AND seq > ?" + _LIVE
        params: list[Any] = [after]
        if until is not None:
            sql += " AND seq <= ?"
            params.append(until)
        if task is not None:
            sql += " AND task = ?"
            params.append(task)
        return [_example(r) for r in self._query(sql + " ORDER BY seq", params)]

    def quarantine(self, after: int, until: int, version: int) -> int:
        """Set aside the examples with ``after < seq <= until`` (rejected with ``version``)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE examples SET quarantined_by = ? WHERE seq > ? AND seq <= ?" + _LIVE,
                (version, after, until),
            )
            return cursor.rowcount

    def conflicts(self, after: int, until: int) -> dict[str, tuple[int, int]]:
        """{task: (new records, new records contradicting an older one)} for seq in (after, until].

        A contradiction is an earlier live record of the same task, instruction and input
        with another output: what a relabelled (shuffled, flipped) copy of old data looks
        like, whatever a model can or cannot learn from it.
        """
        rows = self._query(
            "SELECT n.task, COUNT(*), SUM(EXISTS (SELECT 1 FROM examples o WHERE"
            " o.task = n.task AND o.input = n.input AND o.instruction = n.instruction"
            " AND o.output != n.output AND o.seq <= ? AND o.quarantined_by IS NULL))"
            " FROM examples n WHERE n.seq > ? AND n.seq <= ? AND n.quarantined_by IS NULL"
            " GROUP BY n.task",
            (after, after, until),
        )
        return {task: (int(n), int(bad or 0)) for task, n, bad in rows}

    def quarantined(self) -> dict[int, int]:
        """{version: examples it quarantined}."""
        rows = self._query(
            "SELECT quarantined_by, COUNT(*) FROM examples WHERE quarantined_by IS NOT NULL"
            " GROUP BY quarantined_by"
        )
        return {int(v): int(n) for v, n in rows}

    def train_outputs(self, until: int | None = None) -> dict[str, list[str]]:
        """Each task's distinct train outputs (live records, ``seq <= until``), sorted."""
        sql = "SELECT DISTINCT task, output FROM examples WHERE split='train'" + _LIVE
        params: list[Any] = []
        if until is not None:
            sql += " AND seq <= ?"
            params.append(until)
        out: dict[str, list[str]] = {}
        for task, output in self._query(sql + " ORDER BY task, output", params):
            out.setdefault(task, []).append(output)
        return out

    def outputs(self, task: str) -> list[str]:
        """Every stored output of ``task`` (train and test): what a label set is judged on."""
        return [o for (o,) in self._query("SELECT output FROM examples WHERE task = ?", (task,))]

    def get(self, ids: Sequence[str]) -> list[Example]:
        if not ids:
            return []
        out: list[Example] = []
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT {_COLUMNS} FROM examples WHERE id IN ({marks})", chunk)
            out.extend(_example(r) for r in rows)
        return out

    def replay_sample(self, n: int, seed: int, until: int | None = None) -> list[Example]:
        """A seeded, task-balanced sample of ``n`` train examples with ``seq <= until``.

        Each task gets an equal share (a task with fewer examples gives its unused share to
        the others); within a task, reservoir sampling (Algorithm R) over the stored rows
        keeps memory at O(n) however large the store grows.
        """
        if n <= 0:
            return []
        until = self.max_seq() if until is None else until
        sizes = dict(
            self._query(
                "SELECT task, COUNT(*) FROM examples WHERE split='train' AND seq <= ?"
                + _LIVE
                + " GROUP BY task ORDER BY task",
                (until,),
            )
        )
        quota = _balanced_quota(sizes, n)
        rng = random.Random(seed)
        chosen: list[str] = []
        for task in sorted(quota):
            reservoir: list[str] = []
            k = quota[task]
            with self._lock:
                cursor = self._db.execute(
                    "SELECT id FROM examples WHERE split='train' AND task=? AND seq <= ?"
                    + _LIVE
                    + " ORDER BY seq",
                    (task, until),
                )
                for i, (id_,) in enumerate(cursor):
                    if i < k:
                        reservoir.append(id_)
                    else:
                        j = rng.randint(0, i)
                        if j < k:
                            reservoir[j] = id_
            chosen.extend(reservoir)
        by_id = {e.id: e for e in self.get(chosen)}
        return [by_id[i] for i in chosen]


def _balanced_quota(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over tasks as evenly as their sizes allow (water-filling)."""
    quota = {task: 0 for task in sizes}
    remaining = min(n, sum(sizes.values()))
    open_tasks = sorted(t for t, size in sizes.items() if size > 0)
    while remaining > 0 and open_tasks:
        share, extra = divmod(remaining, len(open_tasks))
        for i, task in enumerate(open_tasks):
            give = min(share + (1 if i < extra else 0), sizes[task] - quota[task])
            quota[task] += give
            remaining -= give
        open_tasks = [t for t in open_tasks if quota[t] < sizes[t]]
    return quota
