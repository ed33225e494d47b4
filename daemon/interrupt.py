"""Ctrl-C for commands that loop: a flag beside the usual KeyboardInterrupt."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType


@dataclass
class Interrupted:
    seen: bool = False  # a plain attribute: a signal handler must not take a lock


@contextmanager
def interrupt_flag() -> Iterator[Interrupted]:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt as usual and also sets the flag yielded: an
    interrupt Python swallows (raised inside a finalizer or a callback from C, where it is
    only printed) still ends a loop that checks the flag."""
    flag = Interrupted()

    def interrupted(signum: int, frame: FrameType | None) -> None:
        flag.seen = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
