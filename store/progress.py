"""Progress of a long phase (training, Fisher, evaluation, export, parity, a download).

On a terminal it is a tqdm bar on stderr. Anywhere else (a pipe, systemd's journal, a JSON
log) it is a log event now and then: the first after ``FIRST_EVENT_S`` (a phase shorter than
that stays silent), then every ``EVENT_EVERY_S``, and one when a phase that logged ends; each
event carries its figures as structured fields (``phase``, ``done``, ``total``, ``unit``,
``rate``, ``eta_s``), which the JSON log format writes as keys. Never a bar inside a JSON
log: a logging handler whose formatter says ``emits_json`` turns bars off.

No torch here: it lives in the store so that ``aftertune pull`` (the consumer side) and the
learners share it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

from tqdm import tqdm

log = logging.getLogger("aftertune.progress")

T = TypeVar("T")

FIRST_EVENT_S = 2.0
EVENT_EVERY_S = 10.0


def bars_wanted() -> bool:
    """A bar only on a terminal, and never when the log is JSON lines."""
    if not sys.stderr.isatty():
        return False
    handlers = logging.getLogger().handlers
    return not any(getattr(h.formatter, "emits_json", False) for h in handlers)


class Progress:
    """``with Progress("evaluate parity", total=40, unit="example") as p: ... p.update(8)``.

    ``enabled=False`` shows and logs nothing (a caller that reports progress itself).
    """

    def __init__(
        self,
        phase: str,
        total: float | None = None,
        unit: str = "item",
        *,
        enabled: bool = True,
        initial: float = 0,
        unit_scale: bool = False,
    ) -> None:
        self.phase = phase
        self.total = total
        self.unit = unit
        self.done = initial
        self.enabled = enabled
        self.started = time.monotonic()
        self._initial = initial
        self._next_event = self.started + FIRST_EVENT_S
        self._logged = False
        self._bar: Any = None
        if enabled and bars_wanted():
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=phase,
                unit=unit,
                unit_scale=unit_scale,
                leave=False,
                mininterval=0.5,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, one update after each; the phase ends with the loop."""
        try:
            for item in items:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: float = 1, **postfix: object) -> None:
        """``n`` more units done; ``postfix`` (loss=...) shows on the bar and in events."""
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: str(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if now >= self._next_event:
            self._next_event = now + EVENT_EVERY_S
            self._event("running", now, postfix)

    def close(self, failed: bool = False) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._logged:
            self._event("failed" if failed else "done", time.monotonic(), {})
        self.enabled = False

    def _event(self, state: str, now: float, postfix: dict[str, object]) -> None:
        self._logged = True
        elapsed = now - self.started
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        eta = None
        if self.total is not None and rate > 0 and state == "running":
            eta = max(0.0, (self.total - self.done) / rate)
        fields: dict[str, object] = {
            "phase": self.phase,
            "state": state,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "elapsed_s": round(elapsed, 1),
            "rate": round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1),
            **postfix,
        }
        of = f" of {self._amount(self.total)}" if self.total is not None else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = f", about {eta:.0f} s left" if eta is not None else ""
        log.info(
            "%s: %s, %s%s%s in %.0f s, %s/s%s",
            self.phase,
            state,
            self._amount(self.done, unit=self.total is None or self.unit == "B"),
            of,
            share,
            elapsed,
            self._amount(rate),
            left,
            extra={"fields": fields},
        )

    def _amount(self, value: float | None, *, unit: bool = True) -> str:
        """'12 tasks', '1 task', '3.8 MB' (bytes in SI units); ``unit=False``: '12'."""
        if value is None:
            return "?"
        if self.unit == "B":
            for prefix in ("B", "kB", "MB"):
                if value < 1000:
                    return f"{value:.0f} B" if prefix == "B" else f"{value:.1f} {prefix}"
                value /= 1000
            return f"{value:.1f} GB"
        if not unit:
            return _num(value)
        plural = value != 1 and self.unit != "s"  # a unit symbol (s) has no plural
        return f"{_num(value)} {_plural(self.unit) if plural else self.unit}"


@contextmanager
def ticking(phase: str, *, enabled: bool = True) -> Iterator[Progress]:
    """Progress of a step with nothing to count (a subprocess, one long call): seconds pass.

    A side thread adds one second at a time, so the bar moves and log events come as for
    any other phase. The step itself runs in the caller's thread.
    """
    progress = Progress(phase, unit="s", enabled=enabled)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            progress.update(1)

    thread = threading.Thread(target=tick, name=f"progress-{phase}", daemon=True)
    thread.start()
    failed = False
    try:
        yield progress
    except BaseException:
        failed = True
        raise
    finally:
        stop.set()
        thread.join()
        progress.close(failed=failed)


def _plural(unit: str) -> str:
    """'task' -> 'tasks', 'batch' -> 'batches' (English adds -es after s, x, ch, sh)."""
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.3g}"
