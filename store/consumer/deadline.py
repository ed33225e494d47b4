"""HTTP exchanges with a total deadline: connect, headers and body together, not per read.

A socket timeout bounds each read, so a server that drips one byte every few seconds never
trips it and holds a pull for as long as it likes. ``fetch`` starts a timer with the request;
when it fires, the socket is shut down, which ends any read blocked on it at once, and every
read after the deadline fails with ``DeadlineExceeded``. Redirects are not followed: a bearer
token goes to the address it was given for, never to one a server names.

urllib rather than a hand-made client, so proxies (``http_proxy``) keep working; its
connection classes only learn to hand their socket to the deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from aftertune.store.errors import BundleError


class DeadlineExceeded(BundleError):
    """An HTTP exchange outlasted its total deadline."""


class HttpStatus(BundleError):
    """The server answered with an error status; ``body``: the start of what it said."""

    def __init__(self, url: str, code: int, body: str) -> None:
        super().__init__(f"GET {url}: HTTP {code}")
        self.code = code
        self.body = body


class Deadline:
    """A total time limit on one exchange; thread-safe (the timer shuts the socket down)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket) -> socket.socket:
        """``sock`` is shut down when the deadline passes (at once if it has)."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def extend(self, seconds: float) -> None:
        """Move the deadline ``seconds`` later (a body's size known from its headers)."""
        with self._lock:
            if self.expired:
                return
            self._timer.cancel()
            self.seconds += seconds
            self.at += seconds
            self._timer = threading.Timer(self.left(), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        with self._lock:
            self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already, or detached by TLS
        sock.shutdown(socket.SHUT_RDWR)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is answered as an HTTPError


def _opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """An opener whose connections connect within the deadline and hand it their sockets."""

    def watched(base: Any) -> Any:
        class Watched(base):
            def connect(self) -> None:
                conn: Any = self
                conn.timeout = min(conn.timeout or deadline.seconds, max(deadline.left(), 0.001))
                create = conn._create_connection
                conn._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))
                super().connect()
                deadline.watch(conn.sock)  # the TLS socket, once wrapped

        return Watched

    plain, tls = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(plain, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(tls, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(Http(), Https(), _NoRedirect())


class _Body:
    """A response body whose reads fail once the deadline has passed."""

    def __init__(self, response: Any, deadline: Deadline, where: str) -> None:
        self.response = response
        self.headers = response.headers
        self.deadline = deadline
        self.where = where

    def read(self, size: int = -1) -> bytes:
        try:
            data: bytes = self.response.read(size)
        except (OSError, http.client.HTTPException) as exc:
            self._check()
            raise BundleError(f"{self.where}: the connection failed mid-answer ({exc})") from None
        self._check()
        return data

    def _check(self) -> None:
        if self.deadline.expired:
            raise DeadlineExceeded(too_slow(self.where, self.deadline.seconds))


def too_slow(where: str, seconds: float) -> str:
    return (
        f"{where}: no whole answer within {seconds:.0f} s (a total deadline, not a per-read "
        "timeout); the server is too slow or stalls on purpose. Nothing was installed"
    )


@contextlib.contextmanager
def fetch(request: urllib.request.Request, seconds: float) -> Iterator[_Body]:
    """Open ``request`` and yield its body; the whole exchange ends within ``seconds``.

    An error status is HttpStatus (its body read within the deadline too); URLError and
    OSError pass through for the caller to explain, except when the deadline caused them:
    then DeadlineExceeded.
    """
    deadline = Deadline(seconds)
    try:
        try:
            response = _opener(deadline).open(request, timeout=seconds)
        except urllib.error.HTTPError as exc:
            body = b""
            with contextlib.suppress(OSError, http.client.HTTPException):
                body = exc.read(2000)
            exc.close()
            if deadline.expired:
                raise DeadlineExceeded(too_slow(request.full_url, seconds)) from None
            raise HttpStatus(request.full_url, exc.code, body.decode("utf-8", "replace")) from None
        except (OSError, http.client.HTTPException) as exc:
            if deadline.expired:
                raise DeadlineExceeded(too_slow(request.full_url, seconds)) from None
            if isinstance(exc, http.client.HTTPException):
                raise BundleError(f"{request.full_url}: not an HTTP answer ({exc})") from None
            raise
        with response:
            yield _Body(response, deadline, request.full_url)
    finally:
        deadline.cancel()
