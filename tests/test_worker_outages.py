"""One log line per Redis outage, however long it lasts and however many retries it takes.

Driven by the worker's own retries (counted), not by wall-clock sleeps: the same on a fast
machine and on a loaded one. A real Redis, stopped and started on one port.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from aftertune.daemon.embedded_redis import RedisServer, free_port
from aftertune.daemon.ingest import IngestConfig, Ingestor
from aftertune.daemon.worker import Worker
from aftertune.store.examples import ExampleStore


class CountedBackoff(ExponentialBackoff):
    """The worker's backoff, short, counting the waits (one per failed attempt)."""

    def __init__(self) -> None:
        super().__init__(cap=0.02, base=0.005)
        self.waits = 0

    def compute(self, failures: int) -> float:
        self.waits += 1
        return super().compute(failures)


def _wait(what: str, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.01)


def test_each_outage_is_one_line_however_many_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    # No retries inside redis-py (by default 10, ~3 s per failed command): each failed
    # attempt is one of the worker's own, so dozens of them take well under a second.
    client = redis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    store = ExampleStore.in_state_dir(tmp_path / "state")
    config = IngestConfig(
        stream="s", dead_letter_stream="s:dead", group="g", consumer="c", block_ms=50
    )
    backoff = CountedBackoff()
    worker = Worker(Ingestor(client, store, config), backoff=backoff)
    caplog.set_level(logging.INFO, logger="aftertune.daemon.worker")

    def lines(text: str) -> int:
        return sum(text in r.getMessage() for r in list(caplog.records))

    thread = threading.Thread(target=worker.work, daemon=True)
    thread.start()  # Redis is not there yet: an outage from the first attempt
    server = RedisServer(tmp_path / "redis", port=port)
    try:
        for outage in (1, 2):
            waits = backoff.waits
            # Far past the backoff cap: dozens of failed attempts in this one outage.
            _wait("retries", lambda: backoff.waits >= waits + 40)  # noqa: B023
            assert lines("redis unavailable") == outage
            server.start()
            _wait("recovery logged", lambda: lines("redis reachable again") == outage)  # noqa: B023
            polled = backoff.waits
            time.sleep(0.3)  # several polls on a healthy Redis: no retry, no new line
            assert backoff.waits == polled
            server.stop()
        _wait("third outage", lambda: lines("redis unavailable") == 3)
    finally:
        worker.request_stop()
        server.stop()
        thread.join(10)
        store.close()
    assert not thread.is_alive()
    assert lines("redis unavailable") == 3 and lines("redis reachable again") == 2
