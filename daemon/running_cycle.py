"""A learning cycle in progress, as a file any process can read.

``aftertune cycle`` writes ``state_dir/cycle.json`` when it starts, again as training moves
(at most every ``WRITE_EVERY_S``, and when training ends), and removes it when it ends,
however it ends. ``aftertune status`` in another shell reads it, so a cycle run by hand shows
as the daemon's own does. A reader believes the file only while the pid it names is alive:
a run killed with -9 leaves a file that no process is behind.

Light: no torch. ``status`` imports it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aftertune.store.files import write_atomic
from aftertune.store.layout import StateLayout

log = logging.getLogger(__name__)

WRITE_EVERY_S = 1.0  # a training step can take milliseconds: the file follows at this pace


@dataclass
class RunningCycle:
    command: str  # what runs it, e.g. "aftertune cycle"
    pid: int
    started_at: float  # epoch seconds
    step: int = 0  # optimizer steps done; total_steps comes with the first one
    total_steps: int | None = None
    updated_at: float = 0.0

    @property
    def phase(self) -> str:
        """'starting', 'training 40% (step 12 of 30)' or 'evaluating and publishing'.

        'starting' also covers a cycle that resumes a challenger already trained: it
        evaluates with no training step to report.
        """
        if self.total_steps and self.step < self.total_steps:
            share = 100 * self.step // self.total_steps
            return f"training {share}% (step {self.step} of {self.total_steps})"
        return "evaluating and publishing" if self.step else "starting"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "phase": self.phase}


@contextmanager
def running_cycle(state_dir: Path, command: str) -> Iterator[Callable[[int, int], bool]]:
    """Record this process's cycle in ``state_dir`` while the block runs.

    Yields a ``should_stop(step, total_steps)`` for the training loop: it records progress
    and never asks to stop (Ctrl-C stops a cycle run by hand).
    """
    path = StateLayout(state_dir).cycle_in_progress
    cycle = RunningCycle(command=command, pid=os.getpid(), started_at=time.time())
    last_write = time.monotonic()

    def progress(step: int, total_steps: int) -> bool:
        nonlocal last_write
        cycle.step, cycle.total_steps = step, total_steps
        now = time.monotonic()
        if step >= total_steps or now - last_write >= WRITE_EVERY_S:
            last_write = now
            _write(path, cycle)
        return False

    _write(path, cycle)
    try:
        yield progress
    finally:
        found = _read(path)
        if found is not None and found.get("pid") == cycle.pid:  # not a later run's file
            path.unlink(missing_ok=True)


def read_running_cycle(state_dir: Path) -> dict[str, Any] | None:
    """The cycle in progress that a live process recorded in ``state_dir``; None if none."""
    found = _read(StateLayout(state_dir).cycle_in_progress)
    if found is None:
        return None
    try:
        os.kill(int(found["pid"]), 0)
    except PermissionError:  # alive, run by another user
        pass
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None
    return found


def _write(path: Path, cycle: RunningCycle) -> None:
    cycle.updated_at = time.time()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cycle.to_json()).encode())
    except OSError as exc:  # a full disk must not fail the cycle; only status misses it
        log.debug("cycle state not written to %s: %s", path, exc)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
