"""The long-running worker: ingest feedback until told to stop.

The loop reads top to bottom (rq style): stop check → reload check → poll → heartbeat.
Signal handlers only set flags: SIGTERM/SIGINT stop (warm, then cold), SIGHUP reloads.
Outages are waited out with capped exponential backoff and one log line per outage: Redis
unreachable, or the store not writable (disk full, I/O error: the batch is rolled back and
stays pending, and is read again once space returns). Nothing is acknowledged that was not
stored; during an outage the daemon reports not ready.
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
from aftertune.daemon.readiness import Readiness
from aftertune.store.errors import StorageError

log = logging.getLogger(__name__)


# Waits between attempts while Redis or the disk is down: 0.1 s, doubling, at most 5 s.
OUTAGE_BACKOFF = ExponentialBackoff(cap=5.0, base=0.1)


class Outage(str, Enum):
    REDIS = "redis"  # Redis unreachable
    STORAGE = "storage"  # the store cannot write (disk full, I/O error)


_DOWN_MESSAGE = {
    Outage.REDIS: "redis unavailable (%s); retrying with backoff",
    Outage.STORAGE: "store not writable (%s); nothing is acknowledged until it is; retrying",
}
_BACK_MESSAGE = {
    Outage.REDIS: "redis reachable again after %.1fs",
    Outage.STORAGE: "store writable again after %.1fs; ingest resumes",
}


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
        readiness: Readiness | None = None,
    ) -> None:
        self.ingestor = ingestor
        self.heartbeat = heartbeat  # after every poll, with what it ingested
        self.reload = reload
        self.reload_requested = False
        self.backoff = backoff
        self._failures = 0  # consecutive failed attempts in the current outage
        self.stop_mode = StopMode.NONE
        self._wake = threading.Event()
        self.readiness = readiness if readiness is not None else Readiness()
        self._outages: dict[Outage, float] = {}  # outage -> when it began (monotonic)

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
                self._all_back()
            except REDIS_DOWN as exc:
                self._down(Outage.REDIS, exc)
            except StorageError as exc:
                self._down(Outage.STORAGE, exc)
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
                self._back(Outage.REDIS)
                return
            except REDIS_DOWN as exc:
                self._down(Outage.REDIS, exc)

    def _down(self, outage: Outage, exc: BaseException) -> None:
        """One log line when an outage begins, however long it lasts; then wait and retry."""
        if outage not in self._outages:
            self._outages[outage] = time.monotonic()
            log.error(_DOWN_MESSAGE[outage], exc)
            self.readiness.problem(outage.value, str(exc))
        if outage is Outage.REDIS:
            self.ingestor.client.connection_pool.disconnect()
        self._wake.wait(self.backoff.compute(self._failures))
        self._failures += 1
        self._wake.clear()
        # Retry from our own pending entries: what was read and not acknowledged comes first.
        self.ingestor.reread_own_pending()

    def _back(self, outage: Outage) -> None:
        since = self._outages.pop(outage, None)
        if since is not None:
            log.info(_BACK_MESSAGE[outage], time.monotonic() - since)
            self.readiness.resolved(outage.value)
        if not self._outages:
            self._failures = 0
            self.backoff.reset()

    def _all_back(self) -> None:
        """A poll went through: Redis answered, and whatever it read was stored."""
        for outage in list(self._outages):
            self._back(outage)
