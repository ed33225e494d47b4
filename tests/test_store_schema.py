"""Schema versions: today's files upgrade in place, a newer schema is refused."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from aftertune.store.errors import SchemaError
from aftertune.store.examples import SCHEMA_PLAN, ExampleStore
from aftertune.store.records import parse_record
from aftertune.store.registry import Registry

# The example store's schema as aftertune wrote it before schema versions (user_version 0),
# in its oldest form: no quarantined_by column yet.
UNVERSIONED = """
CREATE TABLE examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, task TEXT NOT NULL,
    instruction TEXT NOT NULL, input TEXT NOT NULL, output TEXT NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'test')), pinned INTEGER NOT NULL,
    weight REAL NOT NULL, source TEXT NOT NULL, meta TEXT NOT NULL, added_at REAL NOT NULL
);
CREATE INDEX examples_split_task ON examples (split, task, seq);
CREATE INDEX examples_task_input ON examples (task, input);
"""


def _record(i: int, output: str = "A", task: str = "t") -> bytes:
    body = {"id": f"r{i}", "task": task, "instruction": "Say", "input": f"x{i}", "output": output}
    return json.dumps({**body, "split": "train"}).encode()


def _unversioned_store(path: Path, n: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(UNVERSIONED)
        rows = [
            (f"r{i}", "t", "Say", f"x{i}", "A", "train", 1, 1.0, "", "{}", 0.0)
            for i in range(1, n + 1)
        ]
        db.executemany(
            "INSERT INTO examples (id, task, instruction, input, output, split, pinned, weight,"
            " source, meta, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        db.execute("DELETE FROM examples WHERE seq = ?", (n,))  # seq n must not be reused
        db.commit()


def test_an_unversioned_store_is_upgraded_and_keeps_its_records_and_guarantees(
    tmp_path: Path,
) -> None:
    path = tmp_path / "examples.sqlite3"
    _unversioned_store(path, 5)
    with ExampleStore(path) as store:
        assert store.total() == 4 and store.max_seq() == 4
        assert [e.id for e in store.train_after(0)] == ["r1", "r2", "r3", "r4"]
        again = store.add([parse_record(_record(2)), parse_record(_record(3, output="B"))])
        assert (again.stored, again.duplicates, again.conflicts) == (0, 1, (1,))
        assert store.add([parse_record(_record(6))]).stored == 1
        assert store.max_seq() == 6  # after the deleted 5: a seq is never handed out twice
        assert store.add([parse_record(_record(7, output="B", task="t"))]).stored == 1
        store.add([parse_record(json.dumps({**json.loads(_record(8)), "input": "x1"}).encode())])
        assert store.conflicts(6, 8) == {"t": (2, 0)}
        store.add([parse_record(_record(9, output="B"))])  # a prompt new to the store
        relabel = {**json.loads(_record(10, output="B")), "input": "x2"}
        store.add([parse_record(json.dumps(relabel).encode())])
        assert store.conflicts(8, 10) == {"t": (2, 1)}  # x2 was stored as A: contradicted
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_PLAN.version
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "examples_task_input" not in indexes and "examples_id_key" in indexes


def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "examples.sqlite3"
    ExampleStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_PLAN.version + 1}")
    with pytest.raises(SchemaError, match="newer than this aftertune knows"):
        ExampleStore(path)


def test_an_unversioned_registry_is_adopted(tmp_path: Path) -> None:
    with Registry(tmp_path) as registry:
        assert registry.versions() == []
    db_path = tmp_path / "registry.sqlite3"
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute("PRAGMA user_version = 0")  # as a registry from before versions reads
    with Registry(tmp_path) as registry:
        assert registry.champion() is None
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3


def test_postgres_schema_newer_than_the_code_is_refused(tmp_path: Path, postgres_url: str) -> None:
    import psycopg

    ExampleStore(tmp_path / "unused", postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE aftertune_schema SET version = version + 1 WHERE name = 'examples'")
    with pytest.raises(SchemaError, match="examples schema version 4, newer"):
        ExampleStore(tmp_path / "unused", postgres_url)


def test_two_daemons_adding_the_same_records_at_once_store_each_once(
    tmp_path: Path, postgres_url: str
) -> None:
    """Two stores (two daemons' connections) race over overlapping batches: each record is
    stored once, and seq order is the order the inserts became visible."""
    import threading

    records = [parse_record(_record(i)) for i in range(400)]
    stores = [
        ExampleStore(tmp_path / "a", postgres_url),
        ExampleStore(tmp_path / "b", postgres_url),
    ]
    stored = [0, 0]

    def add(which: int) -> None:
        batches = [records[i : i + 50] for i in range(0, 400, 50)]
        for batch in batches if which == 0 else reversed(batches):
            stored[which] += stores[which].add(batch).stored

    threads = [threading.Thread(target=add, args=(w,)) for w in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sum(stored) == 400
        assert stores[1].total() == 400 and len({e.seq for e in stores[0].train_after(0)}) == 400
    finally:
        for store in stores:
            store.close()


def test_an_unreachable_postgres_is_a_storage_error_without_the_password(tmp_path: Path) -> None:
    from aftertune.daemon.embedded_redis import free_port
    from aftertune.store.errors import StorageError

    url = f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/db"
    with pytest.raises(StorageError) as caught:
        ExampleStore(tmp_path, url)
    assert "127.0.0.1" in str(caught.value) and "s3cret" not in str(caught.value)


def test_store_migrate_upgrades_today_s_files_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    from conftest import run_cli

    state = tmp_path / "state"
    state.mkdir()
    _unversioned_store(state / "examples.sqlite3", 3)
    done = run_cli("store", "migrate", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert "examples schema version 2: ids and prompts indexed by integer keys" in done.stdout
    assert "examples schema version 3: quarantine_reason column" in done.stdout
    assert "created registry schema version 3" in done.stdout
    again = run_cli("store", "migrate", "--state-dir", str(state))
    assert again.stdout.count("schema up to date") == 2
    with contextlib.closing(sqlite3.connect(state / "examples.sqlite3")) as db:
        db.execute("PRAGMA user_version = 7")
    refused = run_cli("store", "migrate", "--state-dir", str(state))
    assert refused.returncode == 1
    assert "examples schema version 7, newer than this aftertune knows (3)" in refused.stderr


def test_store_migrate_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    from conftest import run_cli

    done = run_cli("store", "migrate", "--state-dir", str(tmp_path), "--store-url", postgres_url)
    assert done.returncode == 0, done.stderr
    assert "created examples schema version 3" in done.stdout
    assert not (tmp_path / "examples.sqlite3").exists()


def test_a_postgres_registry_of_version_1_is_migrated(tmp_path: Path, postgres_url: str) -> None:
    import psycopg

    Registry(tmp_path, postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # as version 1 left it
        conn.execute("DROP TABLE state_files")
        conn.execute("DROP TABLE publications")
        conn.execute("DROP TABLE daemons")
        conn.execute("UPDATE aftertune_schema SET version = 1 WHERE name = 'registry'")
    with Registry(tmp_path, postgres_url) as registry:
        assert registry.db.migrated == [
            "registry schema version 2: state_files",
            "registry schema version 3: publications and daemons",
        ]
        fisher = tmp_path / "fisher.safetensors"
        fisher.write_bytes(b"f")
        assert registry.keep_state_file("ewc/fisher.safetensors", fisher)


def test_a_postgres_example_store_of_version_2_gains_quarantine_reasons(
    tmp_path: Path, postgres_url: str
) -> None:
    import psycopg

    ExampleStore(tmp_path, postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # as version 2 left it
        conn.execute("ALTER TABLE examples DROP COLUMN quarantine_reason")
        conn.execute("UPDATE aftertune_schema SET version = 2 WHERE name = 'examples'")
    with ExampleStore(tmp_path, postgres_url) as store:
        assert store.db.migrated == ["examples schema version 3: quarantine_reason column"]
        store.add([parse_record(_record(1))])
        assert store.quarantine(0, store.max_seq(), 0, reason="a data rule") == 1
        (batch,) = store.quarantine_summary()
        assert (batch.version, batch.task, batch.reason, batch.count) == (0, "t", "a data rule", 1)


REGISTRY_V2_TABLES = ("publications", "daemons")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_registry_of_version_2_gains_publications_and_daemons(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    """A registry as version 2 left it keeps its versions and learns publications: the
    manifest sha256 and publisher of a promotion, and each daemon's URL."""
    url = request.getfixturevalue("postgres_url") if engine == "postgresql" else None
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with Registry(tmp_path, url) as registry:
        registry.register_candidate(adapter, parent=None, data_seq=1, training={}, lineage={})
    if url is None:
        with contextlib.closing(sqlite3.connect(tmp_path / "registry.sqlite3")) as db:
            for table in REGISTRY_V2_TABLES:
                db.execute(f"DROP TABLE {table}")
            db.execute("PRAGMA user_version = 2")
            db.commit()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            for table in REGISTRY_V2_TABLES:
                conn.execute(f"DROP TABLE {table}")
            conn.execute("UPDATE aftertune_schema SET version = 2 WHERE name = 'registry'")
    with Registry(tmp_path, url) as registry:
        assert registry.db.migrated == ["registry schema version 3: publications and daemons"]
        assert [v.version for v in registry.versions()] == [1]
        assert registry.publication(1) is None
        registry.record_publication(1, "ab" * 32, "daemon-a")
        registry.record_publication(1, "cd" * 32, "daemon-b")  # exported again elsewhere
        registry.register_daemon("daemon-b", "http://b.internal:8760")
    with Registry(tmp_path, url) as registry:
        found = registry.publication(1)
        assert found is not None and (found.manifest_sha256, found.publisher) == (
            "cd" * 32,
            "daemon-b",
        )
        assert registry.daemon_url("daemon-b") == "http://b.internal:8760"
        assert registry.daemon_url("daemon-x") is None


def test_processes_opening_a_new_store_at_once_create_it_once(tmp_path: Path) -> None:
    """Two daemons starting together on one state dir: each step is checked again under
    the write lock, so the second finds the tables the first made (was: 'table examples
    already exists' and a daemon that did not start)."""
    import threading

    for attempt in range(5):
        state = tmp_path / str(attempt)
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def open_store(
            state: Path = state,
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                ExampleStore.in_state_dir(state).close()
            except BaseException as exc:  # the test reports whatever it was
                errors.append(exc)

        threads = [threading.Thread(target=open_store) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
