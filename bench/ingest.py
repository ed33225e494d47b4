"""Ingest throughput: plain pipelined XADD (the producer's rate) vs stream → store ingest.

    .venv/bin/python bench/ingest.py [--records 50000] [--batch-size 500]

Starts a private redis-server on a free port, prints records/s for both and the ratio.
Targets: ingest ≥ 1.0 × the single-producer push rate and ≥ 20,000 records/s.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    payloads = _payloads(args.records)
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis", port=free_port()) as server,
    ):
        client = redis.Redis.from_url(server.url)
        t0 = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for i, payload in enumerate(payloads, 1):
            pipe.xadd("bench", {"record": payload})
            if i % 1000 == 0:
                pipe.execute()
        pipe.execute()
        push_s = time.perf_counter() - t0

        config = IngestConfig(
            stream="bench",
            dead_letter_stream="bench:dead",
            group="g",
            consumer="c",
            batch_size=args.batch_size,
            block_ms=0,
        )
        with ExampleStore.in_state_dir(tmp) as store:
            ingestor = Ingestor(client, store, config)
            ingestor.ensure_group()
            t0 = time.perf_counter()
            totals = ingestor.drain()
            ingest_s = time.perf_counter() - t0
            if totals.stored != args.records:
                raise SystemExit(f"stored {totals.stored} of {args.records}")
    push_rate = args.records / push_s
    ingest_rate = args.records / ingest_s
    print(f"machine: {platform.machine()}, {platform.python_version()}")
    print(f"records: {args.records}, ingest batch size {args.batch_size}")
    print(f"(a) redis-py pipelined XADD : {push_rate:10,.0f} records/s")
    print(f"(b) ingest stream -> store  : {ingest_rate:10,.0f} records/s")
    print(f"ratio b/a                   : {ingest_rate / push_rate:10.2f}")


if __name__ == "__main__":
    main()
