"""sd_notify over a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aftertune.daemon.notify import Heartbeat, Notifier, WatchdogPinger


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def drain(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2.0)


def test_states_arrive_as_exact_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert received(sock) == "READY=1"
    notifier.status("ingesting\n12 stored")
    assert received(sock) == "STATUS=ingesting 12 stored"
    notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"
    notifier.stopping()
    assert received(sock) == "STOPPING=1"
    notifier.send("EXTEND_TIMEOUT_USEC=5000000")
    assert received(sock) == "EXTEND_TIMEOUT_USEC=5000000"
    notifier.close()


def test_reloading_carries_monotonic_time(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    before = time.monotonic_ns() // 1000
    Notifier(path).reloading()
    first, second = received(sock).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= time.monotonic_ns() // 1000


def test_abstract_namespace_socket() -> None:
    name = f"aftertune-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == "READY=1"
    finally:
        sock.close()


def test_multiline_field_is_refused() -> None:
    with pytest.raises(ValueError, match="one line"):
        Notifier("/nonexistent").send(STATUS="a\nWATCHDOG=1")


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()
    assert not notifier.watchdog()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(os.getpid())}, 2.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "main"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_from_env(env: dict[str, str], expected: float | None) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval_s == expected


def test_vanished_socket_is_logged_once_and_never_raises(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = listener
    notifier = Notifier(path)
    assert notifier.ready()
    sock.close()
    os.unlink(path)
    with caplog.at_level(logging.WARNING, logger="aftertune.daemon.notify"):
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    # systemd re-creating its socket (daemon-reexec) is picked up again.
    again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    again.bind(path)
    again.settimeout(2.0)
    try:
        assert notifier.watchdog()
        assert received(again) == "WATCHDOG=1"
    finally:
        again.close()


def test_pinger_pings_at_its_interval(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    pinger = WatchdogPinger(Notifier(path), 0.05, alive=lambda: True)
    pinger.start()
    time.sleep(0.5)
    pinger.stop(timeout=1.0)
    assert not pinger.is_alive()
    pings = drain(sock)
    assert set(pings) == {"WATCHDOG=1"}
    assert 7 <= len(pings) <= 11


def test_pinger_withholds_pings_while_the_main_loop_is_stale(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    heartbeat = Heartbeat(max_age_s=0.2)
    pinger = WatchdogPinger(Notifier(path), 0.02, alive=heartbeat.is_recent)
    pinger.start()
    time.sleep(0.1)
    assert len(drain(sock)) >= 2  # heartbeat fresh: pings flow
    time.sleep(0.25)  # the main loop "hangs": no beat for longer than max_age_s
    drain(sock)
    time.sleep(0.2)
    assert drain(sock) == []
    heartbeat.beat()  # it recovers
    time.sleep(0.1)
    assert len(drain(sock)) >= 2
    pinger.stop(timeout=1.0)
    assert not pinger.is_alive()


def test_pinger_refuses_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="> 0"):
        WatchdogPinger(Notifier(None), 0, alive=lambda: True)
