"""A frozen Redis (SIGSTOP: connections are accepted, nothing is answered) used to be
reported not ready only once the worker's 30 s socket timeout expired (issue 25). The real
``aftertune serve`` against its own real redis-server: ``/readyz`` and ``aftertune_ready``
turn within ``redis.ping_timeout_s`` plus one ping interval, back once Redis answers, and
the records producers sent during the freeze are all stored."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from test_daemon import (  # the daemon-driving helpers; spawn is a fixture
    STOP_TIMEOUT_S,
    Daemon,
    daemon_env,
    http_get,
    metric,
    parity,
    spawn,  # noqa: F401
    stored,
    wait_for,
    wait_ready,
)

from aftertune.daemon.embedded_redis import RedisServer, free_port
from aftertune.daemon.readiness import PING_EVERY_S

pytestmark = pytest.mark.slow

PING_TIMEOUT_S = 1.0
# Detection takes at most one interval and one timeout; the rest is for two loaded cores.
SEEN_WITHIN_S = PING_TIMEOUT_S + PING_EVERY_S + 2.0
STREAM = "aftertune:feedback"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it is frozen, which the session's must not be."""
    server = RedisServer(tmp_path / "redis", port=free_port()).start()
    try:
        yield server
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
        server.stop()


def _ready(daemon: Daemon) -> tuple[int, float | None]:
    """(/readyz status, aftertune_ready)."""
    status = http_get(daemon.url + "/readyz")[0]
    return status, metric(http_get(daemon.url + "/metrics")[1], "aftertune_ready")


def _xadd(url: str, rows: list[dict[str, str]]) -> None:
    """What a producer does; against a frozen Redis it waits for it to wake."""
    client = redis.Redis.from_url(url)
    try:
        for row in rows:
            client.xadd(STREAM, {"record": json.dumps(row)})
    finally:
        client.close()


def test_a_frozen_redis_turns_readiness_within_the_ping_timeout_and_nothing_is_lost(
    own_redis: RedisServer,
    tmp_path: Path,
    spawn: Callable[..., Daemon],  # noqa: F811 - the fixture imported above
) -> None:
    assert own_redis.pid is not None
    env = daemon_env(
        own_redis.url,
        tmp_path / "state",
        free_port(),
        AFTERTUNE_CYCLE__ENABLED="false",
        AFTERTUNE_REDIS__PING_TIMEOUT_S=str(PING_TIMEOUT_S),
    )
    daemon = spawn(env)
    wait_ready(daemon)
    rows = parity(150, seed=3)
    _xadd(own_redis.url, rows[:100])
    wait_for("100 records stored", lambda: stored(env) == 100, 60, daemon)
    assert _ready(daemon) == (200, 1.0)

    os.kill(own_redis.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    producer = threading.Thread(target=_xadd, args=(own_redis.url, rows[100:]), daemon=True)
    producer.start()  # blocked until Redis wakes
    wait_for("/readyz 503", lambda: _ready(daemon)[0] == 503, SEEN_WITHIN_S, daemon, every=0.1)
    seen_after = time.monotonic() - frozen_at
    assert seen_after < SEEN_WITHIN_S, seen_after
    assert _ready(daemon) == (503, 0.0)
    assert http_get(daemon.url + "/healthz")[0] == 200  # alive, only not ready
    time.sleep(2 * PING_EVERY_S)
    assert _ready(daemon) == (503, 0.0)  # it stays so while Redis is silent
    assert producer.is_alive()

    os.kill(own_redis.pid, signal.SIGCONT)
    wait_for("/readyz 200 again", lambda: _ready(daemon) == (200, 1.0), SEEN_WITHIN_S, daemon)
    producer.join(30)
    wait_for("all 150 records stored", lambda: stored(env) == 150, 60, daemon)
    assert len(daemon.messages("redis did not answer a ping within 1.0s")) == 1
    assert len(daemon.messages("redis answers pings again")) == 1

    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(STOP_TIMEOUT_S) == 0
