"""Readiness: what ``/readyz`` and ``aftertune_ready`` report.

Ready means the daemon has started (store open, HTTP serving) and no part reports a
problem: the worker marks Redis unreachable, or the store not writable (disk full, I/O
error), for as long as it lasts; the ``RedisPinger`` marks a Redis that stopped answering
(a frozen server still accepts connections, and the worker's blocking read would only see
it when its 30 s socket timeout expires). Set from the worker's and the pinger's threads,
read from the server's.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# How often the pinger asks; a silent Redis is seen within ping_timeout_s + this.
PING_EVERY_S = 1.0
REDIS_SILENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)


class Readiness:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._problems: dict[str, str] = {}  # part ("redis", "storage") -> why

    def started(self) -> None:
        with self._lock:
            self._started = True

    def stopping(self) -> None:
        with self._lock:
            self._started = False

    def problem(self, part: str, reason: str) -> None:
        with self._lock:
            self._problems[part] = reason

    def resolved(self, part: str) -> None:
        with self._lock:
            self._problems.pop(part, None)

    def problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._problems)

    def is_ready(self) -> bool:
        with self._lock:
            return self._started and not self._problems


class RedisPinger(threading.Thread):
    """PINGs Redis on a connection of its own; no answer within ``timeout_s`` marks the
    problem ``redis-ping`` (one log line per outage), the next answer resolves it.

    Its own part, apart from the worker's ``redis``: each clears only what it saw.
    """

    PART = "redis-ping"

    def __init__(self, url: str, readiness: Readiness, timeout_s: float) -> None:
        super().__init__(name="aftertune-redis-ping", daemon=True)
        self.readiness = readiness
        self.timeout_s = timeout_s
        self.every_s = min(PING_EVERY_S, timeout_s)
        # No retries inside redis-py: one unanswered PING is the verdict.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._halt = threading.Event()
        self._silent_since: float | None = None  # monotonic, while Redis does not answer

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.ping_once()
                self._halt.wait(self.every_s)
        finally:
            self.client.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(self.timeout_s + 1)

    def ping_once(self) -> None:
        try:
            self.client.ping()
        except REDIS_SILENT as exc:
            # A late reply must not be read as the next PING's: start on a fresh connection.
            self.client.connection_pool.disconnect()
            if self._silent_since is None:
                self._silent_since = time.monotonic()
                log.warning(
                    "redis did not answer a ping within %.1fs (%s); not ready until it does",
                    self.timeout_s,
                    exc,
                )
                self.readiness.problem(
                    self.PART, f"no answer to PING within {self.timeout_s}s: {exc}"
                )
            return
        if self._silent_since is not None:
            log.info("redis answers pings again after %.1fs", time.monotonic() - self._silent_since)
            self._silent_since = None
            self.readiness.resolved(self.PART)
