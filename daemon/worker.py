"""The long-running worker: ingest feedback until told to stop.

The loop reads top to bottom (rq style): stop check → reload check → poll → heartbeat.
Signal handlers only set flags: SIGTERM/SIGINT stop (warm, then cold), SIGHUP reloads.
Redis outages are waited out with capped exponential backoff and one log line per outage;
nothing is acknowledged that was not stored.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from enum import Enum
from types import FrameType

import redis
from redis.backoff import AbstractBackoff, ExponentialBackoff

from aftertune.daemon.ingest import REDIS_DOWN, Ingestor, IngestStats

log = logging.getLogger(__name__)


# Waits between attempts while Redis is down: 0.1 s, doubling, at most 5 s.
OUTAGE_BACKOFF = ExponentialBackoff(cap=5.0, base=0.1)


class StopMode(str, Enum):
    NONE = "none"
    WARM = "warm"  # finish the current step, then exit cleanly
    COLD = "cold"  # exit as soon as possible


class Worker:
    """Drives an Ingestor; `burst=True` stops once the stream and pending lists are drained."""

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        heartbeat: Callable[[IngestStats], None] = lambda stats: None,
        reload: Callable[[], None] = lambda: None,
        backoff: AbstractBackoff = OUTAGE_BACKOFF,
    ) -> None:
        self.ingestor = ingestor
        self.heartbeat = heartbeat  # after every poll, with what it ingested
        self.reload = reload
        self.reload_requested = False
        self.backoff = backoff
        self._failures = 0  # consecutive failed attempts in the current outage
        self.stop_mode = StopMode.NONE
        self._wake = threading.Event()
        self._outage_since: float | None = None

    # Signal handlers only set flags; the loop acts on them.
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self._wake.set()

    def request_stop(self) -> None:
        self.stop_mode = StopMode.WARM if self.stop_mode is StopMode.NONE else StopMode.COLD
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self.stop_mode is not StopMode.NONE

    def work(self, *, burst: bool = False, max_polls: int | None = None) -> IngestStats:
        """Run the loop; returns what was ingested. Exits on stop request, burst drain or max_polls."""
        log.info("worker started (%s)", "burst" if burst else "continuous")
        polls = 0
        self._ensure_group()
        while not self.stopping:
            if max_polls is not None and polls >= max_polls:
                break
            polls += 1
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            stats = IngestStats()
            try:
                if burst:
                    stats = self.ingestor.drain(should_stop=lambda: self.stopping)
                    if not self.stopping:
                        self.heartbeat(stats)
                        break
                else:
                    stats = self.ingestor.poll()
                self._redis_back()
            except REDIS_DOWN as exc:
                self._redis_down(exc)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning(
                        "consumer group vanished (Redis restarted without data?); recreating"
                    )
                    self._ensure_group()
                    continue
                raise
            self.heartbeat(stats)
        totals = self.ingestor.totals
        log.info(
            "worker stopped: %d read, %d stored, %d duplicates, %d dead-lettered",
            totals.read,
            totals.stored,
            totals.duplicates,
            totals.dead,
        )
        return totals

    def _ensure_group(self) -> None:
        while not self.stopping:
            try:
                self.ingestor.ensure_group()
                self._redis_back()
                return
            except REDIS_DOWN as exc:
                self._redis_down(exc)

    def _redis_down(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.error("redis unavailable (%s); retrying with backoff", exc)
        self.ingestor.client.connection_pool.disconnect()
        self._wake.wait(self.backoff.compute(self._failures))
        self._failures += 1
        self._wake.clear()
        # A consumer that reconnects re-reads its own pending entries first.
        self.ingestor.reread_own_pending()

    def _redis_back(self) -> None:
        if self._outage_since is not None:
            log.info("redis reachable again after %.1fs", time.monotonic() - self._outage_since)
            self._outage_since = None
        self._failures = 0
        self.backoff.reset()
