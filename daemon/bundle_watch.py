"""The daemon's watch over its published bundles: a sweep at start, then periodically.

Runs in a thread of its own so a large bundle's hashing never holds up ingest, the server
or a cycle. Each ``SWEEP_EVERY_S`` it re-hashes every file whose identity on disk changed;
every ``REHASH_EVERY_S`` (and at start) it re-hashes everything, for damage that leaves no
trace in a file's metadata (bit rot). What fails is taken out of service by the shared
``store.bundle_audit.BundleAudit``, whose ``on_damaged`` counts it and asks for a repair.
"""

from __future__ import annotations

import logging
import threading
import time

from aftertune.store.bundle_audit import BundleAudit

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 60.0
REHASH_EVERY_S = 24 * 3600.0


class BundleWatch:
    def __init__(self, audit: BundleAudit) -> None:
        self.audit = audit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bundle-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        next_rehash = 0.0
        while not self._stop.is_set():
            rehash = time.monotonic() >= next_rehash
            if rehash:
                next_rehash = time.monotonic() + REHASH_EVERY_S
            try:
                self.audit.sweep(rehash=rehash)
            except Exception:
                log.exception("bundle sweep failed; retried in %.0f s", SWEEP_EVERY_S)
            self._stop.wait(SWEEP_EVERY_S)
