"""The HTTP server lets no client hold a connection for ever: idle, slow-header, too many.

uvicorn's keep-alive timer starts only after a response and stops at the first byte, so a
client that connected and sent nothing, or sent a header line every few seconds, used to
keep its connection (and a file descriptor of the daemon) indefinitely.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from fastapi import FastAPI

from aftertune.daemon.server import (
    MAX_REQUEST_HEAD_BYTES,
    REQUEST_TIMEOUT_S,
    HttpServer,
    build_app,
)

SLACK_S = 3.0  # scheduling on a loaded machine


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    servers: list[HttpServer] = []

    def _start(app: FastAPI | None = None, **limits: object) -> HttpServer:
        app = app or build_app(
            tmp_path, token=None, ready=lambda: True, metrics=prometheus_client.CollectorRegistry()
        )
        server = HttpServer(app, "127.0.0.1", 0, **limits)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


def _connect(server: HttpServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _closed_after(sock: socket.socket, limit_s: float, keep_sending: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (sending ``keep_sending`` every 0.2 s)."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit_s:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            if keep_sending:
                try:
                    sock.sendall(keep_sending)
                except OSError:
                    return time.monotonic() - started
        except OSError:  # reset
            return time.monotonic() - started
    raise AssertionError(f"the connection was still open after {limit_s:.1f}s")


def _get(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One whole response (head and Content-Length body) to GET ``path``; returns the head."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_the_default_deadline_is_short() -> None:
    assert REQUEST_TIMEOUT_S <= 30


def test_a_connection_that_sends_nothing_is_closed(start: object) -> None:
    server = start(request_timeout_s=1.0)  # type: ignore[operator]
    with _connect(server) as idle:
        assert _closed_after(idle, 1.0 + SLACK_S) >= 0.9


def test_a_request_head_sent_slowly_is_closed(start: object) -> None:
    """Slowloris: a header line every 0.2 s never completes the request."""
    server = start(request_timeout_s=1.0)  # type: ignore[operator]
    with _connect(server) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert _closed_after(slow, 1.0 + SLACK_S, keep_sending=b"X-Slow: 1\r\n") >= 0.9


def test_a_kept_alive_connection_is_closed_once_idle(start: object) -> None:
    server = start(keep_alive_s=1, request_timeout_s=30.0)  # type: ignore[operator]
    with _connect(server) as conn:
        assert b" 200 " in _get(conn)
        assert b" 200 " in _get(conn)  # kept alive between requests
        assert _closed_after(conn, 1.0 + SLACK_S) >= 0.9


def test_a_slow_answer_is_not_cut_by_the_request_deadline(start: object) -> None:
    """The deadline covers receiving the request; a long response (a download) runs on."""
    app = FastAPI()

    @app.get("/slow")
    def slow() -> dict[str, str]:
        time.sleep(2.0)
        return {"status": "done"}

    server = start(app, request_timeout_s=0.5)  # type: ignore[operator]
    with _connect(server) as conn:
        assert b" 200 " in _get(conn, "/slow")


@pytest.mark.parametrize("pieces", [1, 7, 300])
def test_request_headers_are_capped_in_total_however_they_arrive(
    start: object, pieces: int
) -> None:
    """70 KB of headers in one read, in a few reads or in many: 431, connection closed; a
    request just under the cap is answered."""
    server = start()  # type: ignore[operator]
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    with _connect(server) as sock:
        step = -(-len(head) // pieces)
        try:
            for i in range(0, len(head), step):
                sock.sendall(head[i : i + step])
        except OSError:
            pass  # closed on us mid-send: refused
        sock.settimeout(10)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    with _connect(server) as sock:
        pad = b"a" * (MAX_REQUEST_HEAD_BYTES - 200)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad + b"\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_past_the_connection_limit_requests_get_503(start: object) -> None:
    server = start(max_connections=3)  # type: ignore[operator]
    held = [_connect(server) for _ in range(3)]
    try:
        time.sleep(0.3)  # the server has accepted them
        with _connect(server) as extra:
            assert b" 503 " in _get(extra)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    with _connect(server) as again:
        assert b" 200 " in _get(again)
