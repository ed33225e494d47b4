"""Bundles reach every daemon: follow the promotions stream and pull what others publish.

Several daemons share one Redis and one PostgreSQL; one of them trains and publishes. Each
other daemon reads ``aftertune:promotions`` (``XREAD BLOCK``) and, for an event another
daemon published, pulls that bundle from the publisher's HTTP server into its own
``bundles/`` (staged, every byte checked against the manifest, renamed in:
``pull.pull_published``), moves its ``latest`` and keeps ``export.keep`` bundles. So a consumer may point at any daemon.

At start the newest event is followed first: a daemon that was down, or starts late,
catches up before it serves. A failed pull (publisher unreachable, a bad byte) is logged
and tried again with the next event, or after ``RETRY_S`` for the newest one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from aftertune.daemon.announce import Promotion, newest_promotion, promotion
from aftertune.store.bundles import latest_version, prune, set_latest
from aftertune.store.consumer.format import manifest_sha256, version_dir_name
from aftertune.store.consumer.pull import HttpSource, pull_published
from aftertune.store.errors import BundleError

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # one XREAD waits this long, so a stop request is seen within a second
RETRY_S = 10.0  # a pull that failed is tried again after this long


@dataclass(frozen=True)
class FollowConfig:
    stream: str  # redis.promotions_stream
    bundles_dir: Path
    me: str  # this daemon's publisher name (redis.consumer): its own events are skipped
    token: str | None  # the server token this cluster shares, to pull from the others
    keep: int  # export.keep: bundles kept, as the publisher keeps them


class BundleFollower:
    def __init__(self, client: redis.Redis, config: FollowConfig) -> None:
        self.client = client
        self.config = config
        self.pulled: list[int] = []  # versions pulled, in order (tests and the status line)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = "0-0"
        self._unfollowed: Promotion | None = None  # the newest event, if its pull failed

    def start(self) -> None:
        """Catch up with the newest event now, then follow the stream in a thread."""
        try:
            newest = newest_promotion(self.client, self.config.stream)
        except redis.RedisError as exc:
            log.warning("cannot read %s (%s); following from its start", self.config.stream, exc)
            newest = None
        if newest is not None:
            self._last_id = newest.entry_id
            self._follow(newest)
        self._thread = threading.Thread(target=self._run, name="bundle-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply: Any = self.client.xread(
                    {self.config.stream: self._last_id}, count=16, block=BLOCK_MS
                )
            except redis.RedisError as exc:
                log.debug("promotions not read (%s); retrying", exc)
                self._stop.wait(RETRY_S)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    event = promotion(entry_id, fields)
                    if event is not None:
                        self._follow(event)
            if not reply and self._unfollowed is not None:
                self._stop.wait(RETRY_S)
                self._follow(self._unfollowed)

    def _follow(self, event: Promotion) -> None:
        """Make ``event``'s bundle this daemon's ``latest``, pulling it if it is not here."""
        if event.publisher == self.config.me or not event.server:
            return  # ours, or from a daemon that serves nothing
        self._unfollowed = None
        bundles = self.config.bundles_dir
        local = bundles / version_dir_name(event.version)
        if self._have(local, event) and latest_version(bundles) == event.version:
            return
        try:
            if not self._have(local, event):
                source = HttpSource(event.server, self.config.token)
                pull_published(source, bundles, event.version)
                self.pulled.append(event.version)
            set_latest(bundles, event.version)
            prune(bundles, self.config.keep)
        except (BundleError, OSError) as exc:
            self._unfollowed = event
            log.warning("v%d from %s not pulled: %s", event.version, event.publisher, exc)
            return
        log.info("v%d pulled from %s (%s); latest", event.version, event.publisher, event.server)

    @staticmethod
    def _have(local: Path, event: Promotion) -> bool:
        try:
            return manifest_sha256(local) == event.manifest_sha256
        except (BundleError, OSError):
            return False
