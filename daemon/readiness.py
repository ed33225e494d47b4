"""Readiness: what ``/readyz`` and ``aftertune_ready`` report.

Ready means the daemon has started (store open, HTTP serving) and no part reports a
problem: the worker marks Redis unreachable, or the store not writable (disk full, I/O
error), for as long as it lasts. Set from the worker's thread, read from the server's.
"""

from __future__ import annotations

import threading


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
