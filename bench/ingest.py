"""Ingest throughput: plain pipelined XADD (the producer's rate) vs stream → store ingest.

    .venv/bin/python bench/ingest.py [--records 50000] [--batch-size 1000] [--breakdown] [--floor]
    .venv/bin/python bench/ingest.py --store-url postgresql://USER@HOST/DB [--consumers 2]

Starts a private redis-server on a free port, prints records/s for both and the ratio.
Targets: ingest ≥ 1.0 × the single-producer push rate and ≥ 20,000 records/s.
``--breakdown`` then ingests the records again into a fresh store and stream, one stage at
a time, and prints µs a record for each: read (XREADGROUP and its parse), validate, store
(one SQLite transaction a batch), acknowledge (XACK).

``--floor`` also times the least a Python consumer can do with the same records: one
XREADGROUP parsed by hiredis, one msgspec decode, the content id (sha256), the two keys,
one ``executemany`` into the real table and its indexes, XACK. It skips what the daemon
must do besides (value checks, the duplicate lookup, the split hash, dead-lettering), so
its rate is a ceiling for any pure-Python consumer on this machine, not a way to ingest.

``--store-url`` ingests into PostgreSQL instead (a scratch database created next to the
one named, dropped after), first with one consumer, then with ``--consumers`` processes
in the same group (as that many daemons would), each on its own copy of the stream, and
prints both rates and their ratio. Target: two consumers ≥ 1.4 × one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import redis

from aftertune.daemon.embedded_redis import RedisServer, free_port
from aftertune.daemon.ingest import RECORD_FIELD, IngestConfig, Ingestor
from aftertune.store.examples import _INSERTED, ExampleStore
from aftertune.store.records import _WIRE, content_id
from aftertune.store.schema import prompt_key, text_key


def _payloads(n: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "task": f"task{i % 8}",
                "instruction": "Classify the sentiment of the sentence as POS or NEG.",
                "input": f"review number {i}: the film was " + ("good" if i % 2 else "bad"),
                "output": "POS" if i % 2 else "NEG",
            }
        ).encode()
        for i in range(n)
    ]


def _push(client: redis.Redis, stream: str, payloads: list[bytes]) -> float:
    """Pipelined XADD, 1,000 a round trip; returns the seconds it took."""
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i, payload in enumerate(payloads, 1):
        pipe.xadd(stream, {"record": payload})
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - t0


def _breakdown(client: redis.Redis, tmp: Path, payloads: list[bytes], batch: int) -> None:
    """Where one drain's time goes: each stage of Ingestor's batch timed on its own."""
    _push(client, "bench2", payloads)
    config = IngestConfig(
        stream="bench2", dead_letter_stream="bench2:dead", group="g", consumer="c"
    )
    seconds = dict.fromkeys(("read", "validate", "store", "acknowledge"), 0.0)
    with ExampleStore.in_state_dir(tmp / "breakdown") as store:
        ingestor = Ingestor(client, store, config)
        ingestor.ensure_group()
        ingestor.read_size.count = batch
        while True:
            t0 = time.perf_counter()
            entries = ingestor._read(">", block_ms=None)
            t1 = time.perf_counter()
            if not entries:
                break
            triage = ingestor._triage(entries)
            t2 = time.perf_counter()
            store.add(triage.records)
            t3 = time.perf_counter()
            client.xack(config.stream, config.group, *triage.ok_ids)
            t4 = time.perf_counter()
            for stage, span in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                seconds[stage] += span
    per_record = {stage: s / len(payloads) * 1e6 for stage, s in seconds.items()}
    print(
        "where the time goes, µs a record: "
        + ", ".join(f"{stage} {us:.1f}" for stage, us in per_record.items())
        + f" (total {sum(per_record.values()):.1f})"
    )


def _floor(client: redis.Redis, tmp: Path, payloads: list[bytes], batch: int) -> float:
    """Seconds a minimal Python consumer takes to drain ``payloads``: see the module doc."""
    _push(client, "floor", payloads)
    client.xgroup_create("floor", "g", id="0")
    marks = ",".join("?" * len(_INSERTED))
    sql = f"INSERT INTO examples ({', '.join(_INSERTED)}) VALUES ({marks})"
    with ExampleStore.in_state_dir(tmp / "floor") as store:
        db = store.db.connection  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        while reply := client.xreadgroup("g", "c", {"floor": ">"}, count=batch):
            entries = reply[b"floor"][0] if isinstance(reply, dict) else reply[0][1]
            rows, ids, now = [], [], time.time()
            for entry_id, fields in entries:
                w = _WIRE.decode(fields[RECORD_FIELD])
                rid = content_id(w.task, w.instruction, w.input, w.output)
                key = prompt_key(w.task, w.instruction, w.input)
                meta = orjson.dumps(w.meta).decode()
                texts = (w.task, w.instruction, w.input, w.output)
                rows.append(
                    (rid, text_key(rid), key, *texts, "train", 0, w.weight, w.source, meta, now)
                )
                ids.append(entry_id)
            db.execute("BEGIN IMMEDIATE")
            db.executemany(sql, rows)
            db.execute("COMMIT")
            client.xack("floor", "g", *ids)
        seconds = time.perf_counter() - t0
        if store.total() != len(payloads):
            raise SystemExit(f"floor stored {store.total()} of {len(payloads)}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--breakdown", action="store_true", help="time each stage too")
    parser.add_argument(
        "--floor", action="store_true", help="time a minimal Python consumer too (a ceiling)"
    )
    parser.add_argument("--store-url", help="postgresql:// URL: ingest into PostgreSQL")
    parser.add_argument("--consumers", type=int, default=2, help="with --store-url")
    args = parser.parse_args(argv)
    if args.store_url:
        _postgres(args)
        return
    payloads = _payloads(args.records)
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis", port=free_port()) as server,
    ):
        client = redis.Redis.from_url(server.url)
        push_s = _push(client, "bench", payloads)
        ingest_s = _ingest(client, Path(tmp), args.records, args.batch_size)
        push_rate = args.records / push_s
        ingest_rate = args.records / ingest_s
        print(f"machine: {platform.machine()}, {platform.python_version()}")
        print(f"records: {args.records}, ingest batch size {args.batch_size}")
        print(f"(a) redis-py pipelined XADD : {push_rate:10,.0f} records/s")
        print(f"(b) ingest stream -> store  : {ingest_rate:10,.0f} records/s")
        print(f"ratio b/a                   : {ingest_rate / push_rate:10.2f}")
        if args.floor:
            floor_rate = args.records / _floor(client, Path(tmp), payloads, args.batch_size)
            print(f"(c) floor: minimal consumer : {floor_rate:10,.0f} records/s")
            print(f"ratio c/a                   : {floor_rate / push_rate:10.2f}")
        if args.breakdown:
            _breakdown(client, Path(tmp), payloads, args.batch_size)


def _ingest(client: redis.Redis, tmp: Path, records: int, batch: int) -> float:
    """One Ingestor's drain of the stream into a fresh store; returns the seconds it took."""
    config = IngestConfig(
        stream="bench",
        dead_letter_stream="bench:dead",
        group="g",
        consumer="c",
        batch_size=batch,
        block_ms=0,
    )
    with ExampleStore.in_state_dir(tmp) as store:
        ingestor = Ingestor(client, store, config)
        ingestor.ensure_group()
        t0 = time.perf_counter()
        totals = ingestor.drain()
        ingest_s = time.perf_counter() - t0
    if totals.stored != records:
        raise SystemExit(f"stored {totals.stored} of {records}")
    return ingest_s


def _postgres(args: argparse.Namespace) -> None:
    """One consumer, then ``args.consumers`` processes, into fresh PostgreSQL databases."""
    payloads = _payloads(args.records)
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis", port=free_port()) as server,
    ):
        client = redis.Redis.from_url(server.url)
        push_s = _push(client, "bench", payloads)
        rates = []
        for n, stream in ((1, "bench"), (args.consumers, "bench-n")):
            if stream != "bench":
                _push(client, stream, payloads)
            with _scratch_database(args.store_url) as url:
                seconds = _ingest_in_processes(server.url, url, stream, n, args)
                with ExampleStore(Path(tmp) / "unused", url) as store:
                    if store.total() != args.records:
                        raise SystemExit(f"stored {store.total()} of {args.records}")
            rates.append(args.records / seconds)
    print(f"machine: {platform.machine()}, {platform.python_version()}, PostgreSQL store")
    print(f"records: {args.records}, ingest batch size {args.batch_size}")
    print(f"(a) redis-py pipelined XADD   : {args.records / push_s:10,.0f} records/s")
    print(f"(b) one consumer -> PostgreSQL: {rates[0]:10,.0f} records/s")
    print(f"(c) {args.consumers} consumers -> PostgreSQL : {rates[1]:10,.0f} records/s")
    print(f"ratio b/a                     : {rates[0] * push_s / args.records:10.2f}")
    print(f"ratio c/b                     : {rates[1] / rates[0]:10.2f}")


@contextmanager
def _scratch_database(url: str) -> Iterator[str]:
    import psycopg

    name = f"aftertune_bench_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _ingest_in_processes(
    redis_url: str, store_url: str, stream: str, n: int, args: argparse.Namespace
) -> float:
    """Seconds from a common start until ``n`` consumer processes drained ``stream``."""
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Barrier(n + 1), ctx.Event()
    ExampleStore(Path(tempfile.gettempdir()) / "unused", store_url).close()  # schema, once
    redis.Redis.from_url(redis_url).xgroup_create(stream, "g", id="0")
    workers = [
        ctx.Process(
            target=_consume,
            args=(redis_url, store_url, stream, f"c{i}", args.batch_size, ready, go),
        )
        for i in range(n)
    ]
    for worker in workers:
        worker.start()
    ready.wait()
    t0 = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
    return time.perf_counter() - t0


def _consume(
    redis_url: str, store_url: str, stream: str, name: str, batch: int, ready: Any, go: Any
) -> None:
    config = IngestConfig(
        stream=stream,
        dead_letter_stream=f"{stream}:dead",
        group="g",
        consumer=name,
        batch_size=batch,
        block_ms=0,
    )
    client = redis.Redis.from_url(redis_url)
    with ExampleStore(Path(tempfile.gettempdir()) / "unused", store_url) as store:
        ingestor = Ingestor(client, store, config)
        ready.wait()
        go.wait()
        ingestor.drain()


if __name__ == "__main__":
    main()
