"""systemd notification (sd_notify(3)) by hand: datagrams on ``$NOTIFY_SOCKET``.

No libsystemd: the protocol is ``KEY=value`` lines in one datagram to a Unix socket whose
path is in ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Without that
variable every call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager; never raises on a failed send."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the pinger thread and the main loop share the socket
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        usec: int | None = None
        try:
            usec = int(environ.get("WATCHDOG_USEC", ""))
            pid = environ.get("WATCHDOG_PID")
            # The watchdog is meant for the main process, not for a child that inherited it.
            if usec <= 0 or (pid is not None and int(pid) != os.getpid()):
                usec = None
        except ValueError:
            usec = None
        return cls(environ.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """systemd's watchdog timeout (``WatchdogSec=``); ping at least every half of it."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1e6

    def ready(self) -> bool:
        return self.send(READY=1)

    def status(self, text: str) -> bool:
        """Free-form status line shown by ``systemctl status``."""
        return self.send(STATUS=" ".join(text.splitlines()))

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) wants the CLOCK_MONOTONIC time of the reload.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def send(self, message: str | None = None, /, **fields: str | int) -> bool:
        """Send a raw message and/or ``KEY=value`` fields; True when the datagram went out."""
        lines = [message] if message else []
        for key, value in fields.items():
            if "\n" in str(value):
                raise ValueError(f"notify field {key} must be one line, got {value!r}")
            lines.append(f"{key}={value}")
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._failing:  # once per outage, not once per ping
                    log.warning("systemd notify to %r failed: %s", self._address, exc)
                self._failing = True
                return False
            if self._failing:
                log.info("systemd notify to %r works again", self._address)
                self._failing = False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Heartbeat:
    """The main loop calls ``beat()`` each turn; ``is_recent()`` tells the pinger it lives."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def is_recent(self) -> bool:
        return time.monotonic() - self._last <= self.max_age_s


class WatchdogPinger(threading.Thread):
    """Pings the watchdog every ``interval_s`` while ``alive()`` says the main loop runs.

    A hung main loop stops the pings, so systemd kills and restarts the daemon instead of
    being told, by a healthy side thread, that all is well.
    """

    def __init__(self, notifier: Notifier, interval_s: float, alive: Callable[[], bool]) -> None:
        if interval_s <= 0:
            raise ValueError(f"watchdog interval must be > 0 s, got {interval_s}")
        super().__init__(name="aftertune-watchdog", daemon=True)
        self.notifier = notifier
        self.interval_s = interval_s
        self.alive = alive
        self._halt = threading.Event()

    def run(self) -> None:
        withheld = False
        while not self._halt.wait(self.interval_s):
            if self.alive():
                withheld = False
                self.notifier.watchdog()
            elif not withheld:
                withheld = True
                log.error("main loop heartbeat is stale; withholding watchdog pings")

    def stop(self, timeout: float | None = None) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)
