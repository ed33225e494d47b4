"""Bundles reach every daemon: follow what the shared registry promotes, pull it from its
publisher.

Several daemons share one Redis and one PostgreSQL; one of them trains and publishes. The
registry is the authority for what is promoted: at promotion it records the sha256 of the
bundle's manifest and the daemon that published it, and every daemon registers the URL its
server answers on. An event on ``aftertune:promotions`` is only a hint that says when to
look, since anyone who can write to Redis can forge one. On an event each other daemon:

- ignores it unless the registry's champion is the version it names;
- pulls that bundle only from the publisher the registry names, at the URL that daemon
  registered (never the event's ``server``), and sends the cluster token there only;
- refuses a manifest whose sha256 is not the one the registry recorded, before any file is
  fetched; every file is then checked against that manifest (``pull.pull_published``:
  staged, verified, renamed in);
- moves its ``latest`` and prunes, never a bundle the registry still needs.

With ``cluster.key`` set, an event without a valid signature is ignored before the registry
is read (a log line each). Without a shared registry (``store.url`` unset) each daemon's
registry is its own, so a daemon follows nothing it did not publish. At start the
registry's champion is caught up first, whatever the stream holds, and staging dirs a
killed pull or export left are removed. A failed pull (publisher unreachable, too slow, a
bad byte) is logged and tried again after ``RETRY_S``; every request has a total deadline,
so a server that drips bytes cannot hold the follower.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from aftertune.daemon.announce import Promotion, newest_promotion, promotion
from aftertune.store.bundles import clean_staging, latest_version, prune, set_latest
from aftertune.store.consumer.format import manifest_sha256, version_dir_name
from aftertune.store.consumer.pull import HttpSource, pull_published
from aftertune.store.errors import BundleError, StoreError
from aftertune.store.registry import Publication, Registry

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # one XREAD waits this long, so a stop request is seen within a second
RETRY_S = 10.0  # a pull that failed is tried again after this long
TIMEOUT_S = 30.0  # connecting and each answer's headers; files get more by their size


@dataclass(frozen=True)
class FollowConfig:
    stream: str  # redis.promotions_stream
    bundles_dir: Path
    me: str  # this daemon's publisher name (redis.consumer)
    token: str | None  # the server token this cluster shares, sent to registered daemons only
    keep: int  # export.keep: bundles kept, as the publisher keeps them
    state_dir: Path
    store_url: str | None  # the shared registry (store.url); None: nothing is followed
    timeout_s: float = TIMEOUT_S
    key: bytes | None = None  # cluster.key: events must be signed with it; None: unsigned


class BundleFollower:
    def __init__(self, client: redis.Redis, config: FollowConfig) -> None:
        self.client = client
        self.config = config
        self.pulled: list[int] = []  # versions pulled, in order (tests and the status line)
        self.ignored = 0  # events naming a version the registry does not have as champion
        self.behind = False  # the champion's bundle is not here yet: tried again after RETRY_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = "0-0"

    def start(self) -> None:
        """Catch up with the registry's champion now, then follow the stream in a thread."""
        removed = clean_staging(self.config.bundles_dir, at_start=True)
        if removed:
            log.info("removed what interrupted pulls and exports left: %s", ", ".join(removed))
        if self.config.store_url is None:
            log.info(
                "store.url is unset: this daemon's registry is its own, so it follows no "
                "promotion it did not publish (docs/operations.md, Trust model)"
            )
            return
        try:
            newest = newest_promotion(self.client, self.config.stream)
        except redis.RedisError as exc:
            log.warning("cannot read %s (%s); following from its start", self.config.stream, exc)
            newest = None
        if newest is not None:
            self._last_id = newest.entry_id
        self._sync(None)  # the registry's champion, whatever the newest event says
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
                    if event is not None and not self._stop.is_set() and self._signed(event):
                        self._sync(event)
            if not reply and self.behind:
                self._stop.wait(RETRY_S)
                if not self._stop.is_set():
                    self._sync(None)

    def _sync(self, event: Promotion | None) -> None:
        """Make the registry's champion this daemon's ``latest``, pulling it if it is not here;
        ``event`` (None: a catch-up or a retry) is followed only if it names that champion."""
        try:
            with Registry(self.config.state_dir, self.config.store_url) as registry:
                found = self._champion(registry, event)
                if found is not None:
                    self._install(registry, found)
        except (BundleError, OSError) as exc:
            self.behind = True
            log.warning("champion's bundle not pulled: %s; tried again in %.0f s", exc, RETRY_S)
        except StoreError as exc:
            self.behind = True
            log.warning("registry not read (%s); tried again in %.0f s", exc, RETRY_S)

    def _signed(self, event: Promotion) -> bool:
        """True without a cluster key; with one, whether the event carries its signature."""
        if self.config.key is None or event.signed_with(self.config.key):
            return True
        self.ignored += 1
        log.warning(
            "ignored a promotion event for v%d (entry %s, publisher %r): %s; cluster.key is "
            "set, so every event must be signed with it",
            event.version,
            event.entry_id,
            event.publisher,
            "a wrong signature" if event.signature else "no signature",
        )
        return False

    def _champion(self, registry: Registry, event: Promotion | None) -> Publication | None:
        """The champion's publication, if this daemon should have its bundle; else None."""
        champion = registry.champion()
        if event is not None and (champion is None or champion.version != event.version):
            self.ignored += 1
            who = f"v{champion.version}" if champion else "the base model"
            log.warning(
                "ignored a promotion event for v%d (publisher %r, server %r): the registry's "
                "champion is %s. Events are hints; whoever can write to Redis can forge one",
                event.version,
                event.publisher,
                event.server,
                who,
            )
            return None
        self.behind = False
        if champion is None:
            return None
        found = registry.publication(champion.version)
        if found is None:
            log.debug("v%d has no published bundle in the registry", champion.version)
            return None
        if found.publisher == self.config.me:
            return None  # ours: our own promotion moves our latest
        return found

    def _install(self, registry: Registry, found: Publication) -> None:
        bundles, version = self.config.bundles_dir, found.version
        local = bundles / version_dir_name(version)
        if not self._have(local, found):
            url = registry.daemon_url(found.publisher)
            if url is None:
                raise BundleError(
                    f"v{version}'s publisher {found.publisher!r} has registered no server URL "
                    "(it registers server.advertise_url when its server starts)"
                )
            source = HttpSource(url, self.config.token, timeout=self.config.timeout_s)
            pull_published(source, bundles, version, found.manifest_sha256)
            self.pulled.append(version)
            log.info("v%d pulled from %s (%s); latest", version, found.publisher, url)
        if latest_version(bundles) != version:
            set_latest(bundles, version)
        removed = prune(bundles, self.config.keep, protect=registry.needed_versions())
        if removed:
            log.info("pruned bundles %s", ", ".join(f"v{v}" for v in removed))

    @staticmethod
    def _have(local: Path, found: Publication) -> bool:
        try:
            return manifest_sha256(local) == found.manifest_sha256
        except (BundleError, OSError):
            return False
