"""Ingest throughput: plain pipelined XADD (the producer's rate) vs stream → store ingest.

    .venv/bin/python bench/ingest.py [--records 50000] [--batch-size 1000] [--breakdown]

Starts a private redis-server on a free port, prints records/s for both and the ratio.
Targets: ingest ≥ 1.0 × the single-producer push rate and ≥ 20,000 records/s.
``--breakdown`` then ingests the records again into a fresh store and stream, one stage at
a time, and prints µs a record for each: read (XREADGROUP and its parse), validate, store
(one SQLite transaction a batch), acknowledge (XACK).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import redis

from aftertune.daemon.embedded_redis import RedisServer, free_port
from aftertune.daemon.ingest import IngestConfig, Ingestor
from aftertune.store.examples import ExampleStore


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--breakdown", action="store_true", help="time each stage too")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
