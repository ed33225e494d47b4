"""The answer server's bundle, swapped when the ``current`` link moves.

``BundleSlot.bundle`` is the bundle a request answers with: a request reads it once and
keeps that object to the end, so a swap never changes a bundle under a request in flight
(the old one is freed when its last request lets go). A watcher thread notices the link
move, opens and verifies the new bundle off the request path (``Bundle.open`` checks every
file's sha256), and only then rebinds ``bundle``: one reference assignment, atomic for every
reader. A bundle that does not open is refused and logged; the old one keeps answering,
and the same target is not tried again until the link moves or its manifest changes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from aftertune.store.consumer import Bundle
from aftertune.store.errors import BundleError

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5  # how often the watcher looks at the link (one realpath + one stat)


class BundleSlot:
    """The bundle behind ``link`` (``DIR/current``), hot-swapped when the link moves."""

    def __init__(
        self,
        link: Path,
        *,
        interval_s: float = WATCH_INTERVAL_S,
        on_swap: Callable[[Bundle], None] = lambda bundle: None,
        on_refused: Callable[[str, str], None] = lambda target, reason: None,
    ) -> None:
        self.link = Path(link)
        self.interval_s = interval_s
        self.on_swap = on_swap
        self.on_refused = on_refused
        self.bundle = self._open(self._target())  # start-up: a bundle that fails is fatal
        self._seen = self._identity(self._target())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _target(self) -> Path:
        return Path(os.path.realpath(self.link))

    @staticmethod
    def _identity(target: Path) -> tuple[str, int, int]:
        """What tells one bundle from the next: its directory and its manifest's file."""
        try:
            st = (target / "manifest.json").stat()
        except OSError:
            return (str(target), 0, 0)
        return (str(target), st.st_ino, st.st_mtime_ns)

    def _open(self, target: Path) -> Bundle:
        try:
            return Bundle.open(target)
        except FileNotFoundError:
            raise BundleError(
                f"{self.link} points at nothing: pull a bundle first "
                "(`aftertune pull --server URL --to DIR`)"
            ) from None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="bundle-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def check(self) -> bool:
        """Swap if the link moved to a bundle that verifies; True when it swapped."""
        target = self._target()
        identity = self._identity(target)
        if identity == self._seen:
            return False
        self._seen = identity
        try:
            fresh = self._open(target)
        except (BundleError, OSError, ValueError) as exc:
            log.error(
                "refused the bundle at %s (%s): v%d keeps answering; pull a good bundle again",
                target,
                exc,
                self.bundle.version,
            )
            self.on_refused(str(target), str(exc))
            return False
        old, self.bundle = self.bundle, fresh
        log.info("swapped v%d for v%d (%s)", old.version, fresh.version, target)
        self.on_swap(fresh)
        return True
