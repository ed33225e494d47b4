"""Ingest against hostile entries and a failing disk: a reused id, two record fields, huge
entries, the store refusing writes. A real Redis and a real SQLite throughout; "disk full"
is SQLite's own SQLITE_FULL from ``PRAGMA max_page_count`` (the daemon-level test in
test_storage_outage.py fills a real file-size limit instead).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import run_cli

from aftertune.daemon.ingest import REUSED_ID, IngestConfig, Ingestor
from aftertune.daemon.readiness import Readiness
from aftertune.daemon.worker import Worker
from aftertune.store.examples import ExampleStore

STREAM, DEAD = "s", "s:dead"


def _record(i: int, **extra: object) -> bytes:
    row = {"task": "echo", "instruction": "Repeat.", "input": f"item {i}", "output": str(i)}
    return json.dumps({**row, **extra}).encode()


@pytest.fixture
def make_ingestor(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Callable[..., Ingestor]]:
    stores: list[ExampleStore] = []

    def make(**config: int) -> Ingestor:
        store = ExampleStore.in_state_dir(tmp_path / "state")
        stores.append(store)
        settings = IngestConfig(
            stream=STREAM, dead_letter_stream=DEAD, group="g", consumer="c", block_ms=0, **config
        )
        ingestor = Ingestor(redis_client, store, settings)
        ingestor.ensure_group()
        return ingestor

    yield make
    for store in stores:
        store.close()


def _dead_reasons(client: redis.Redis) -> list[str]:
    return [fields[b"reason"].decode() for _, fields in client.xrange(DEAD)]


def test_an_id_reused_with_other_content_is_dead_lettered(
    redis_client: redis.Redis, make_ingestor: Callable[..., Ingestor]
) -> None:
    ingestor = make_ingestor()
    redis_client.xadd(STREAM, {"record": _record(1, id="order-7")})
    redis_client.xadd(STREAM, {"record": _record(1, id="order-7")})  # a true duplicate
    redis_client.xadd(STREAM, {"record": _record(2, id="order-7")})  # the id, reused
    totals = ingestor.drain()
    assert (totals.stored, totals.duplicates, totals.dead) == (1, 1, 1)
    assert _dead_reasons(redis_client) == [REUSED_ID]
    assert [e.output for e in ingestor.store.get(["order-7"])] == ["1"]
    assert redis_client.xpending(STREAM, "g")["pending"] == 0


def test_an_entry_with_two_record_fields_is_dead_lettered(
    redis_client: redis.Redis, make_ingestor: Callable[..., Ingestor]
) -> None:
    ingestor = make_ingestor()
    redis_client.execute_command("XADD", STREAM, "*", "record", _record(1), "record", _record(2))
    totals = ingestor.drain()
    assert (totals.stored, totals.dead) == (0, 1)
    assert _dead_reasons(redis_client) == [
        "entry has more than one 'record' field; send one record per entry"
    ]
    assert ingestor.store.total() == 0


def test_a_near_duplicate_record_field_is_dead_lettered_with_the_reason(
    redis_client: redis.Redis, make_ingestor: Callable[..., Ingestor]
) -> None:
    """'RECORD' beside 'record' used to be dropped unread; now the entry is refused whole."""
    ingestor = make_ingestor()
    redis_client.execute_command("XADD", STREAM, "*", "record", _record(1), "RECORD", _record(2))
    redis_client.execute_command("XADD", STREAM, "*", "record", _record(3), " record", _record(4))
    redis_client.xadd(STREAM, {"record": _record(5), "source": b"x"})  # another field: fine
    totals = ingestor.drain()
    assert (totals.stored, totals.dead) == (1, 2)
    reasons = _dead_reasons(redis_client)
    assert "entry has 'RECORD' beside 'record'; field names are matched exactly" in reasons[0]
    assert "entry has ' record' beside 'record'" in reasons[1]
    assert ingestor.store.total() == 1


def test_task_names_are_nfc_and_a_mixed_script_name_is_dead_lettered(
    redis_client: redis.Redis, make_ingestor: Callable[..., Ingestor]
) -> None:
    ingestor = make_ingestor()
    redis_client.xadd(STREAM, {"record": _record(1, task="caf\u00e9")})  # precomposed é
    redis_client.xadd(STREAM, {"record": _record(1, task="cafe\u0301")})  # e + combining acute
    redis_client.xadd(STREAM, {"record": _record(2, task="p\u0430rity")})  # Cyrillic а
    redis_client.xadd(STREAM, {"record": _record(3, task="\u043f\u0430\u0440")})  # all Cyrillic
    totals = ingestor.drain()
    assert (totals.stored, totals.duplicates, totals.dead) == (2, 1, 1)
    assert set(ingestor.store.counts()) == {"caf\u00e9", "\u043f\u0430\u0440"}
    (reason,) = _dead_reasons(redis_client)
    assert "field 'task' mixes scripts" in reason and "U+0430" in reason


def test_a_task_written_in_look_alikes_of_a_known_one_is_dead_lettered_naming_it(
    redis_client: redis.Redis,
    redis_url: str,
    make_ingestor: Callable[..., Ingestor],
    tmp_path: Path,
) -> None:
    """Whole-script look-alikes: each letter Cyrillic, Greek or fullwidth, so the mixed-script
    rule cannot see them; only the names already stored tell them from a real task. (Written
    as escapes: on screen they are the point, indistinguishable.)"""
    cyrillic_spec, fullwidth_spec = "\u0455\u0440\u0435\u0441", "\uff53\uff50\uff45\uff43"
    greek_taxi = "\u03a4\u0391\u03a7\u0399"
    cyrillic_scope, cyrillic_copy = "\u0455\u0441\u043e\u0440\u0435", "\u0441\u043e\u0440\u0443"
    russian = "\u043e\u0442\u0437\u044b\u0432"  # a Cyrillic word that imitates nothing
    ingestor = make_ingestor()
    for i, task in enumerate(["spec", "TAXI"]):
        redis_client.xadd(STREAM, {"record": _record(i, task=task)})
    ingestor.drain()
    imitations = {cyrillic_spec: "spec", fullwidth_spec: "spec", greek_taxi: "TAXI"}
    for i, task in enumerate([*imitations, russian]):
        redis_client.xadd(STREAM, {"record": _record(10 + i, task=task)})
    totals = ingestor.drain()
    assert (totals.stored, totals.dead) == (1, 3)
    reasons = _dead_reasons(redis_client)
    for reason, (task, imitated) in zip(reasons, imitations.items(), strict=True):
        assert reason.startswith(
            f"field 'task' {task!r} looks like the existing task {imitated!r} but is another name"
        ), reason
    assert "Cyrillic '\u0455' U+0455" in reasons[0] and "Fullwidth" in reasons[1]

    # Another daemon's ingestor knows the names from the store, not from what it read itself.
    other = make_ingestor()
    redis_client.xadd(STREAM, {"record": _record(30, task=cyrillic_spec)})
    # In one batch: a new Latin name, then its look-alike (refused); a new look-alike, then
    # the Latin name it imitates (both kept: a name written as it looks is never refused).
    for i, task in enumerate(["scope", cyrillic_scope, cyrillic_copy, "copy"]):
        redis_client.xadd(STREAM, {"record": _record(40 + i, task=task)})
    totals = other.drain()
    assert (totals.stored, totals.dead) == (3, 2)
    reasons = _dead_reasons(redis_client)
    assert "looks like the existing task 'spec'" in reasons[3]
    assert "looks like the existing task 'scope'" in reasons[4]
    tasks = {"spec", "TAXI", russian, "scope", cyrillic_copy, "copy"}
    assert set(other.store.counts()) == tasks

    # What got in side by side, `aftertune status` names, with the letters that imitate.
    env = {"AFTERTUNE_STATE_DIR": str(tmp_path / "state"), "AFTERTUNE_REDIS__URL": redis_url}
    done = run_cli("status", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (
        f"look-alike task names: 'copy' and '{cyrillic_copy}' are different tasks "
        f"('{cyrillic_copy}': Cyrillic '\u0441' U+0441, Cyrillic '\u043e' U+043E, "
        "Cyrillic '\u0440' U+0440, Cyrillic '\u0443' U+0443)"
    ) in done.stdout
    assert done.stdout.count("look-alike task names") == 1


def test_a_batch_holds_about_max_batch_bytes(
    redis_client: redis.Redis, make_ingestor: Callable[..., Ingestor]
) -> None:
    mib = 1024 * 1024
    ingestor = make_ingestor(max_record_bytes=2 * mib, max_batch_bytes=3 * mib)
    for i in range(12):  # twelve valid 1 MiB records
        redis_client.xadd(STREAM, {"record": _record(i, input="x" * mib + str(i))})
    largest_read, stored = 0, 0
    for _ in range(50):
        stats = ingestor.poll(block_ms=0)
        largest_read = max(largest_read, stats.read_bytes)
        stored += stats.stored
        if stored == 12:
            break
    assert stored == 12
    assert largest_read <= 3 * mib


def test_a_full_store_acks_nothing_reports_not_ready_and_resumes(
    redis_client: redis.Redis,
    make_ingestor: Callable[..., Ingestor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ingestor = make_ingestor()
    store = ingestor.store
    redis_client.xadd(STREAM, {"record": _record(0)})
    ingestor.drain()
    pages = store.db.connection.execute("PRAGMA page_count").fetchone()[0]
    store.db.connection.execute(f"PRAGMA max_page_count = {pages}")  # full: the next write fails
    for i in range(1, 300):
        redis_client.xadd(STREAM, {"record": _record(i)})
    redis_client.xadd(STREAM, {"nothing": b"here"})  # a bad entry waits with its batch
    readiness = Readiness()
    readiness.started()
    worker = Worker(ingestor, readiness=readiness)
    thread = threading.Thread(target=worker.work, daemon=True)
    caplog.set_level(logging.INFO, logger="aftertune.daemon.worker")
    thread.start()
    try:
        _wait(lambda: "storage" in readiness.problems())
        stored_before = store.total()  # the first small batches fit in the free pages
        time.sleep(1.0)  # several retries (backoff 0.1 s, doubling)
        assert not readiness.is_ready()
        assert "database or disk is full" in readiness.problems()["storage"]
        assert store.total() == stored_before < 300
        assert redis_client.xpending(STREAM, "g")["pending"] > 0  # read, not acknowledged
        assert redis_client.xlen(DEAD) == 0
        store.db.connection.execute("PRAGMA max_page_count = 1073741823")  # space returns
        _wait(lambda: store.total() == 300 and readiness.is_ready(), timeout=15)
        _wait(lambda: redis_client.xpending(STREAM, "g")["pending"] == 0)
        assert redis_client.xlen(DEAD) == 1
    finally:
        worker.request_stop()
        thread.join(10)
    down = [r for r in caplog.records if "store not writable" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in down]
    assert "database or disk is full" in down[0].getMessage()
    assert any("store writable again" in r.getMessage() for r in caplog.records)


def test_readiness_follows_redis(tmp_path: Path) -> None:
    from aftertune.daemon.embedded_redis import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    store = ExampleStore.in_state_dir(tmp_path / "state")
    config = IngestConfig(stream=STREAM, dead_letter_stream=DEAD, group="g", consumer="c")
    config = IngestConfig(**{**config.__dict__, "block_ms": 100})
    readiness = Readiness()
    readiness.started()
    worker = Worker(Ingestor(client, store, config), readiness=readiness)
    thread = threading.Thread(target=worker.work, daemon=True)
    thread.start()
    try:
        _wait(readiness.is_ready)
        port = server.port
        server.stop()
        _wait(lambda: not readiness.is_ready())
        assert "redis" in readiness.problems()
        server = RedisServer(tmp_path / "redis", port=port).start()
        _wait(readiness.is_ready, timeout=20)
    finally:
        worker.request_stop()
        thread.join(10)
        server.stop()
        store.close()


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {condition}")
