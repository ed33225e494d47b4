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
import time
from collections.abc import Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from aftertune.store.database import (
    Database,
    Transaction,
    insert_rows,
    is_postgres,
    member_of,
    open_database,
)
from aftertune.store.layout import StateLayout
from aftertune.store.records import Record, rating_of
from aftertune.store.schema import (
    Dialect,
    Migration,
    SchemaPlan,
    prompt_key,
    run_script,
    text_key,
)

# Version 1: the schema before versions (a UNIQUE id, an index on task and input).
_SCHEMA_V1 = """
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

# Version 2: ids and prompts are indexed by integer keys (store/schema.py: text_key), not
# by their text. A 64-hex-char id in a UNIQUE index made each 1,000-record commit rewrite
# ~1,000 random index pages; the keys' indexes are a sixth of the size. Ids stay unique
# because ``add`` looks them up inside its write transaction (BEGIN IMMEDIATE: one writer).
SCHEMA = """
CREATE TABLE examples (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL,
    id_key      INTEGER NOT NULL,
    prompt_key  INTEGER NOT NULL,
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
    quarantined_by INTEGER,
    quarantine_reason TEXT
);
CREATE INDEX examples_id_key ON examples (id_key);
CREATE INDEX examples_prompt_key ON examples (prompt_key);
CREATE INDEX examples_split_task ON examples (split, task, seq)
"""


def _to_v1(db: sqlite3.Connection) -> None:
    run_script(db, _SCHEMA_V1)
    columns = {row[1] for row in db.execute("PRAGMA table_info(examples)")}
    if "quarantined_by" not in columns:  # a store made before quarantine existed
        db.execute("ALTER TABLE examples ADD COLUMN quarantined_by INTEGER")


def _to_v2(db: sqlite3.Connection) -> None:
    """Rebuild the table with key columns (SQLite cannot drop a UNIQUE constraint in place)."""
    (next_seq,) = db.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM (SELECT seq FROM sqlite_sequence"
        " WHERE name = 'examples' UNION ALL SELECT MAX(seq) FROM examples)"
    ).fetchone()
    db.execute("ALTER TABLE examples RENAME TO examples_v1")
    db.execute("DROP INDEX IF EXISTS examples_split_task")
    db.execute("DROP INDEX IF EXISTS examples_task_input")
    run_script(db, SCHEMA)
    db.execute(
        f"INSERT INTO examples (id_key, prompt_key, {_COLUMNS}, quarantined_by)"
        " SELECT aftertune_text_key(id), aftertune_prompt_key(task, instruction, input),"
        f" {_COLUMNS}, quarantined_by FROM examples_v1 ORDER BY seq"
    )
    db.execute("DROP TABLE examples_v1")
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'examples'")
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('examples', ?)", (next_seq,))


# Version 3: why a record was quarantined, beside by which version (0: the data checks that
# run before training, with no version).
_TO_V3 = "ALTER TABLE examples ADD COLUMN quarantine_reason TEXT"


def _to_v3(db: Any) -> None:
    # A file migrated from before version 2 was rebuilt with the current schema (which has
    # the column already); PostgreSQL and version-2 files add it.
    if _has_reason_column(db):
        return
    db.execute(_TO_V3)


def _has_reason_column(db: Any) -> bool:
    if isinstance(db, sqlite3.Connection):
        return "quarantine_reason" in {row[1] for row in db.execute("PRAGMA table_info(examples)")}
    row = db.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_name = 'examples'"
        " AND column_name = 'quarantine_reason'"
    ).fetchone()
    return row is not None


# Version 2 on PostgreSQL (its first): the same columns and indexes, PostgreSQL's types.
POSTGRES_SCHEMA = """
CREATE TABLE examples (
    seq         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id          TEXT    NOT NULL,
    id_key      BIGINT  NOT NULL,
    prompt_key  BIGINT  NOT NULL,
    task        TEXT    NOT NULL,
    instruction TEXT    NOT NULL,
    input       TEXT    NOT NULL,
    output      TEXT    NOT NULL,
    split       TEXT    NOT NULL CHECK (split IN ('train', 'test')),
    pinned      INTEGER NOT NULL,
    weight      DOUBLE PRECISION NOT NULL,
    source      TEXT    NOT NULL,
    meta        TEXT    NOT NULL,
    added_at    DOUBLE PRECISION NOT NULL,
    quarantined_by INTEGER,
    quarantine_reason TEXT
);
CREATE INDEX examples_id_key ON examples (id_key);
CREATE INDEX examples_prompt_key ON examples (prompt_key);
CREATE INDEX examples_split_task ON examples (split, task, seq)
"""

SCHEMA_PLAN = SchemaPlan(
    name="examples",
    version=3,
    create=SCHEMA,
    migrations=(
        Migration(1, "versioned; quarantined_by column", _to_v1),
        Migration(2, "ids and prompts indexed by integer keys", _to_v2),
        Migration(3, "quarantine_reason column", _to_v3),
    ),
    postgres_create=POSTGRES_SCHEMA,
    postgres_migrations=(Migration(3, "quarantine_reason column", _to_v3),),
)

DATA_CHECKS = 0  # quarantined_by of records the data checks set aside before any training

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


@dataclass(frozen=True)
class QuarantinedBatch:
    """Records set aside together: by one version (0: the data checks), of one task, for one
    reason; ``first``/``last`` are their lowest and highest seq."""

    version: int
    task: str
    reason: str
    count: int
    first: int
    last: int


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


_INSERTED = (
    "id",
    "id_key",
    "prompt_key",
    "task",
    "instruction",
    "input",
    "output",
    "split",
    "pinned",
    "weight",
    "source",
    "meta",
    "added_at",
)


def _rows(records: Sequence[Record], keys: dict[str, int], now: float) -> list[tuple[Any, ...]]:
    return [
        (
            r.id,
            keys[r.id],
            prompt_key(r.task, r.instruction, r.input),
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
    """The store of examples (SQLite at ``path``, or PostgreSQL at ``url``); thread-safe."""

    def __init__(self, path: Path | str, url: str | None = None) -> None:
        self.path = Path(path)
        self.db: Database = open_database(self.path, url, SCHEMA_PLAN)

    @classmethod
    def in_state_dir(cls, state_dir: Path | str, url: str | None = None) -> ExampleStore:
        """The store of ``state_dir``: its SQLite file, or the PostgreSQL at ``url`` if set."""
        return cls(StateLayout(state_dir).examples_db, url)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[Transaction]:
        return self.db.transaction()

    def add(self, records: Sequence[Record]) -> Added:
        """Insert records in one transaction; duplicates are skipped, reused ids refused.

        A record whose id is already stored (or came earlier in ``records``) with the same
        content is a duplicate; with other content it is a conflict and is not stored.
        Raises StorageError when the disk refuses the write (nothing is stored then).
        """
        if not records:
            return Added(0, 0)
        keys = {r.id: text_key(r.id) for r in records}
        with self._transaction() as db:
            known = self._stored_content(db, keys)
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
            insert_rows(db, "examples", _INSERTED, _rows(new, keys, time.time()))
        return Added(len(new), duplicates, tuple(conflicts))

    @staticmethod
    def _stored_content(db: sqlite3.Connection, ids: dict[str, int]) -> dict[str, tuple[Any, ...]]:
        """{id: content} of the stored records among ``ids`` ({id: key}), matched by text."""
        wanted = ids.keys()
        keys = list(set(ids.values()))
        found: dict[str, tuple[Any, ...]] = {}
        dialect = Dialect.POSTGRESQL if is_postgres(db) else Dialect.SQLITE
        for start in range(0, len(keys), 500):
            where, params = member_of(dialect, "id_key", keys[start : start + 500])
            for row in db.execute(f"SELECT {_CONTENT} FROM examples WHERE {where}", params):
                if row[0] in wanted:
                    found[row[0]] = tuple(row)
        return found

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return self.db.query(sql, tuple(params))

    def counts(self) -> dict[str, dict[str, int]]:
        """{task: {"train": n, "test": n}}: live records (not quarantined) of every task that
        has any; ``quarantined_counts`` counts the others."""
        out: dict[str, dict[str, int]] = {}
        for task, split, n in self._query(
            "SELECT task, split, SUM(CASE WHEN quarantined_by IS NULL THEN 1 ELSE 0 END)"
            " FROM examples GROUP BY task, split ORDER BY task"
        ):
            out.setdefault(task, {"train": 0, "test": 0})[split] = int(n)
        return out

    def quarantined_counts(self) -> dict[str, int]:
        """{task: records set aside} for every task that has any."""
        rows = self._query(
            "SELECT task, COUNT(*) FROM examples WHERE quarantined_by IS NOT NULL"
            " GROUP BY task ORDER BY task"
        )
        return {str(t): int(n) for t, n in rows}

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
        return sorted(t for (t,) in self._query(sql, params))  # code point order on both engines

    def count_train_after(self, seq: int) -> int:
        """How many train examples arrived after watermark ``seq``."""
        rows = self._query(
            "SELECT COUNT(*) FROM examples WHERE split='train' AND seq > ?" + _LIVE, (seq,)
        )
        return int(rows[0][0])

    def first_added_after(self, seq: int) -> float | None:
        """When the oldest live train example after watermark ``seq`` arrived (None: none)."""
        rows = self._query(
            "SELECT MIN(added_at) FROM examples WHERE split='train' AND seq > ?" + _LIVE, (seq,)
        )
        return None if rows[0][0] is None else float(rows[0][0])

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

    def quarantine(
        self,
        after: int,
        until: int,
        version: int,
        *,
        tasks: Collection[str] | None = None,
        reason: str = "",
    ) -> int:
        """Set aside the live examples with ``after < seq <= until`` (of ``tasks`` only, when
        given), rejected by ``version`` (``DATA_CHECKS``: before training) for ``reason``."""
        sql = "UPDATE examples SET quarantined_by = ?, quarantine_reason = ? WHERE seq > ?"
        params: list[Any] = [version, reason or None, after]
        sql += " AND seq <= ?" + _LIVE
        params.append(until)
        if tasks is not None:
            if not tasks:
                return 0
            where, more = member_of(self.db.dialect, "task", sorted(tasks))
            sql += f" AND {where}"
            params += list(more)
        with self._transaction() as db:
            return db.execute(sql, params).rowcount

    def quarantine_summary(self) -> list[QuarantinedBatch]:
        """What is set aside, by the version that rejected it, task and reason."""
        rows = self._query(
            "SELECT quarantined_by, task, COALESCE(quarantine_reason, ''), COUNT(*),"
            " MIN(seq), MAX(seq) FROM examples WHERE quarantined_by IS NOT NULL"
            " GROUP BY quarantined_by, task, COALESCE(quarantine_reason, '')"
            " ORDER BY quarantined_by, task"
        )
        return [
            QuarantinedBatch(int(v), t, r, int(n), int(lo), int(hi)) for v, t, r, n, lo, hi in rows
        ]

    def release(
        self, *, version: int | None = None, task: str | None = None, renew: bool = True
    ) -> int:
        """Put quarantined examples back in service (of ``version`` and/or ``task``; both None:
        every one). With ``renew`` they move to new seqs, after every stored record, in their
        order: the next cycle takes them as new data (a champion's watermark is past their old
        seqs). Without, they count as learned by the version whose window held them."""
        where = " WHERE quarantined_by IS NOT NULL"
        params: list[Any] = []
        if version is not None:
            where += " AND quarantined_by = ?"
            params.append(version)
        if task is not None:
            where += " AND task = ?"
            params.append(task)
        with self._transaction() as db:
            seqs = [
                int(r[0])
                for r in db.execute(
                    f"SELECT seq FROM examples{where} ORDER BY seq", params
                ).fetchall()
            ]
            if not renew or not seqs:
                sql = "UPDATE examples SET quarantined_by = NULL, quarantine_reason = NULL"
                return int(db.execute(sql + where, params).rowcount)
            top = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM examples").fetchone()[0])
            for offset, seq in enumerate(seqs, start=1):
                db.execute(
                    "UPDATE examples SET seq = ?, quarantined_by = NULL, quarantine_reason = NULL"
                    " WHERE seq = ?",
                    (top + offset, seq),
                )
            self._advance_seq(db, top + len(seqs))
            return len(seqs)

    def _advance_seq(self, db: Transaction, seq: int) -> None:
        """Make the next stored record's seq come after ``seq`` (renewed records took it)."""
        if self.db.dialect is Dialect.POSTGRESQL:
            db.execute("SELECT setval(pg_get_serial_sequence('examples', 'seq'), ?)", (seq,))
        else:
            db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'examples'", (seq,))

    def conflicts(self, after: int, until: int) -> dict[str, tuple[int, int]]:
        """{task: (new records, new records contradicting an older one)} for seq in (after, until].

        A contradiction is an earlier live record of the same task, instruction and input
        with another output: what a relabelled (shuffled, flipped) copy of old data looks
        like, whatever a model can or cannot learn from it.
        """
        rows = self._query(
            "SELECT n.task, COUNT(*), SUM(CASE WHEN EXISTS (SELECT 1 FROM examples o WHERE"
            " o.prompt_key = n.prompt_key AND o.task = n.task AND o.input = n.input"
            " AND o.instruction = n.instruction"
            " AND o.output != n.output AND o.seq <= ? AND o.quarantined_by IS NULL)"
            " THEN 1 ELSE 0 END)"
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

    def answer_counts(self, task: str, until: int) -> dict[str, int]:
        """How often each answer was given to ``task`` by live records with ``seq <= until``."""
        rows = self._query(
            "SELECT output, COUNT(*) FROM examples WHERE task = ? AND seq <= ?"
            + _LIVE
            + " GROUP BY output",
            (task, until),
        )
        return {str(o): int(n) for o, n in rows}

    def labelled(self, task: str, until: int) -> list[tuple[int, str, str, str]]:
        """(seq, instruction, input, output) of the live records of ``task``, ``seq <= until``."""
        rows = self._query(
            "SELECT seq, instruction, input, output FROM examples WHERE task = ? AND seq <= ?"
            + _LIVE
            + " ORDER BY seq",
            (task, until),
        )
        return [(int(q), str(i), str(x), str(o)) for q, i, x, o in rows]

    def rated_down(self, task: str, until: int) -> set[int]:
        """Seqs of ``task``'s live records that rate a served answer down (their output is
        the answer a user said is wrong: ``records.rating_of``)."""
        rows = self._query(
            "SELECT seq, meta FROM examples WHERE task = ? AND seq <= ? AND meta LIKE ?" + _LIVE,
            (task, until, '%"rating"%'),
        )
        return {int(q) for q, meta in rows if rating_of(json.loads(meta)) == "down"}

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
        wanted = set(ids)
        keys = list({text_key(i) for i in wanted})
        out: list[Example] = []
        for start in range(0, len(keys), 500):
            where, params = member_of(self.db.dialect, "id_key", keys[start : start + 500])
            rows = self._query(f"SELECT {_COLUMNS} FROM examples WHERE {where}", params)
            out.extend(_example(r) for r in rows if r[1] in wanted)
        return out

    def train_counts(self, until: int | None = None) -> dict[str, int]:
        """Live train records per task with ``seq <= until`` (None: all)."""
        until = self.max_seq() if until is None else until
        return dict(
            self._query(
                "SELECT task, COUNT(*) FROM examples WHERE split='train' AND seq <= ?"
                + _LIVE
                + " GROUP BY task ORDER BY task",
                (until,),
            )
        )

    def sample_train(self, task: str, k: int, seed: str, until: int | None = None) -> list[Example]:
        """A seeded uniform sample of ``k`` live train records of ``task`` with ``seq <= until``.

        Reservoir sampling (Algorithm R) over the stored rows keeps memory at O(k) however
        large the store grows. Which tasks and how many each is the caller's choice
        (``learners/replay.py`` decides what a cycle remembers).
        """
        if k <= 0:
            return []
        until = self.max_seq() if until is None else until
        rng = random.Random(seed)
        reservoir: list[str] = []
        rows = self.db.iterate(
            "SELECT id FROM examples WHERE split='train' AND task=? AND seq <= ?"
            + _LIVE
            + " ORDER BY seq",
            (task, until),
        )
        for i, (id_,) in enumerate(rows):
            if i < k:
                reservoir.append(id_)
            else:
                j = rng.randint(0, i)
                if j < k:
                    reservoir[j] = id_
        by_id = {e.id: e for e in self.get(reservoir)}
        return [by_id[i] for i in reservoir]
