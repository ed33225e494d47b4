"""``aftertune pull --follow``: keep ``DIR/current`` at the latest promoted version.

The loop reads top to bottom (rq style): stop check → pull ``latest`` (the verified, atomic
pull of ``pull.py``) → run the hook after a switch → wait for the next promotion. Waiting
reads the promotions stream (``XREAD BLOCK``) when a Redis URL is given and answers, and
otherwise long-polls the server's ``/v1/models/latest?wait=S`` with the manifest's sha256 as
ETag (the server answers 304 when nothing changed in ``S`` seconds). A promotion event is
only a wake-up: what is installed is what the server's ``latest`` says, every byte checked
against its manifest.

A daemon restarting or unreachable is waited out with capped exponential backoff and one log
line per outage, never a busy loop. The signal handlers only set a flag (STYLE.md); the loop
stops at the next step, and a wait in progress is cut short. Imports no torch.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from redis.backoff import AbstractBackoff, ExponentialBackoff

from aftertune.store.bundles import LATEST
from aftertune.store.consumer.pull import CURRENT, HttpSource, PullResult, pull
from aftertune.store.errors import BundleError

log = logging.getLogger(__name__)

# Waits between attempts while the server or Redis is down: 0.5 s, doubling, at most 30 s.
FOLLOW_BACKOFF = ExponentialBackoff(cap=30.0, base=0.5)
DEFAULT_WAIT_S = 30.0  # one long poll or one XREAD BLOCK; the server caps its own wait
DEFAULT_STREAM = "aftertune:promotions"
HOOK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class FollowSpec:
    """What the follower is told: where to pull from, where to install, how to wait."""

    to_dir: Path
    redis_url: str | None = None
    stream: str = DEFAULT_STREAM
    wait_s: float = DEFAULT_WAIT_S
    exec_cmd: str | None = None  # run by the shell after each switch, DIR/current in its env

    def __post_init__(self) -> None:
        if not 1.0 <= self.wait_s <= 300.0:
            raise ValueError(f"wait_s must be between 1 and 300 seconds, got {self.wait_s:g}")


class Follower:
    """Follows promotions into ``spec.to_dir``; ``run(max_switches=N)`` lets tests drive it."""

    def __init__(
        self,
        source: HttpSource,
        spec: FollowSpec,
        *,
        backoff: AbstractBackoff = FOLLOW_BACKOFF,
        on_switch: Callable[[PullResult], None] | None = None,
    ) -> None:
        self.source = source
        self.spec = spec
        self.backoff = backoff
        self.on_switch = on_switch
        self.switches = 0
        self._stop = threading.Event()  # set by the signal handler; every wait watches it
        self._failures = 0
        self._down_since: float | None = None
        self._last_said = 0.0
        self._redis: redis.Redis | None = None
        self._redis_down = False
        self._current: int | None = None

    # Signal handlers only set the flag; the loop acts on it.
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, *, max_switches: int | None = None) -> int:
        """Follow until stopped (or ``max_switches`` switches); returns how many there were."""
        log.info(
            "following %s into %s (waiting on %s)",
            self.source.url,
            self.spec.to_dir / CURRENT,
            f"the stream {self.spec.stream}" if self.spec.redis_url else "long polls",
        )
        while not self.stopping:
            if max_switches is not None and self.switches >= max_switches:
                break
            try:
                mark = self._stream_mark()
                result = pull(self.source, self.spec.to_dir, LATEST)
                self._back()
                if result.version != self._current:
                    self._switched(result)
                self._wait_for_promotion(result.manifest_sha256, mark)
            except (BundleError, OSError, http.client.HTTPException) as exc:
                self._down(exc)
        log.info("follow stopped after %d switch(es)", self.switches)
        if self._redis is not None:
            self._redis.close()
        return self.switches

    def _switched(self, result: PullResult) -> None:
        first = self._current is None
        self._current = result.version
        if first and not result.downloaded:
            log.info("v%d is current at %s", result.version, result.path)
            return  # nothing moved: no hook for what was already there when we started
        self.switches += 1
        log.info("switched %s to v%d", self.spec.to_dir / CURRENT, result.version)
        if self.on_switch is not None:
            self.on_switch(result)
        if self.spec.exec_cmd:
            run_hook(self.spec.exec_cmd, self.spec.to_dir, result.version)

    # --- waiting for the next promotion ---------------------------------------------------

    def _client(self) -> redis.Redis | None:
        if self.spec.redis_url is None:
            return None
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.spec.redis_url, socket_connect_timeout=5, socket_timeout=self.spec.wait_s + 5
            )
        return self._redis

    def _stream_mark(self) -> str | None:
        """The stream's newest entry id before the pull, so a promotion during it is not missed."""
        client = self._client()
        if client is None:
            return None
        try:
            newest: Any = client.xrevrange(self.spec.stream, count=1)
        except redis.RedisError as exc:
            if not self._redis_down:
                log.warning(
                    "cannot read the promotions stream %s (%s); long-polling %s instead",
                    self.spec.stream,
                    exc,
                    self.source.url,
                )
            self._redis_down = True
            return None
        if self._redis_down:
            log.info("promotions stream %s reachable again", self.spec.stream)
            self._redis_down = False
        return _text(newest[0][0]) if newest else "0-0"

    def _wait_for_promotion(self, manifest_sha256: str, mark: str | None) -> None:
        client = self._client()
        if client is not None and mark is not None:
            try:
                # Short blocks so that a stop request is seen within a second.
                deadline = time.monotonic() + self.spec.wait_s
                while not self.stopping and time.monotonic() < deadline:
                    if client.xread({self.spec.stream: mark}, count=1, block=1000):
                        return
                return
            except redis.RedisError as exc:
                log.warning("promotions stream %s lost (%s); long-polling", self.spec.stream, exc)
                self._redis_down = True
        self._long_poll(manifest_sha256)

    def _long_poll(self, manifest_sha256: str) -> None:
        """GET /v1/models/latest?wait=S with If-None-Match: returns on a change or after S."""
        wait = round(self.spec.wait_s)
        request = urllib.request.Request(f"{self.source.url}/v1/models/latest?wait={wait}")
        request.add_header("If-None-Match", f'"{manifest_sha256}"')
        if self.source.token:
            request.add_header("Authorization", f"Bearer {self.source.token}")
        # The long poll runs in a thread so that a stop request ends the wait at once.
        done = threading.Event()
        failure: list[BaseException] = []

        def poll() -> None:
            try:
                with urllib.request.urlopen(request, timeout=wait + 10):
                    pass
            except urllib.error.HTTPError as exc:
                if exc.code != 304:
                    failure.append(exc)
            except (urllib.error.URLError, OSError) as exc:
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=poll, name="follow-long-poll", daemon=True).start()
        while not done.wait(0.5):
            if self.stopping:
                return
        if failure:
            reason = getattr(failure[0], "reason", failure[0])
            raise BundleError(f"long poll of {self.source.url}/v1/models/latest failed: {reason}")

    # --- outages ----------------------------------------------------------------------------

    def _down(self, exc: Exception) -> None:
        """One log line when an outage begins (and one per minute while it lasts); then wait."""
        delay = self.backoff.compute(self._failures)
        self._failures += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._last_said = now
            log.error("cannot follow %s: %s; retrying with backoff", self.source.url, exc)
        elif now - self._last_said >= 60:
            self._last_said = now
            log.warning(
                "still cannot follow %s after %.0f s (%s); next try in %.1f s",
                self.source.url,
                now - self._down_since,
                exc,
                delay,
            )
        self._stop.wait(delay)

    def _back(self) -> None:
        if self._down_since is not None:
            log.info(
                "%s reachable again after %.1f s",
                self.source.url,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        self._failures = 0
        self.backoff.reset()


def run_hook(command: str, to_dir: Path, version: int) -> int:
    """Run ``--exec`` after a switch; its failure is logged, never fatal to the follower.

    The shell sees ``AFTERTUNE_VERSION`` and ``AFTERTUNE_BUNDLE`` (``DIR/current``).
    """
    env = {
        **os.environ,
        "AFTERTUNE_VERSION": str(version),
        "AFTERTUNE_BUNDLE": str(to_dir / CURRENT),
    }
    try:
        done = subprocess.run(command, shell=True, env=env, timeout=HOOK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        log.error("--exec %r ran past %.0f s after v%d; killed", command, HOOK_TIMEOUT_S, version)
        return -1
    if done.returncode != 0:
        log.error("--exec %r exited %d after the switch to v%d", command, done.returncode, version)
    else:
        log.info("--exec %r done after the switch to v%d", command, version)
    return done.returncode


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
