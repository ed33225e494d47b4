"""A hostile bundle server for trust tests: it serves whatever bundles lie in its directory
(re-sealed copies, forged versions) under the daemon's URL scheme, records every request's
Authorization header, and can drip its answers one byte at a time.

A real HTTP server on a free port (http.server), not a mock: the daemons under test reach
it over TCP exactly as they would reach an attacker's.
"""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

from aftertune.store.consumer.format import MANIFEST


class HostileServer:
    def __init__(self, root: Path, drip_s: float = 0.0, drip_headers: bool = False) -> None:
        self.root = root  # holds vN/ directories, as a daemon's bundles/ does
        self.drip_s = drip_s  # > 0: one byte of every body, then a pause this long
        self.drip_headers = drip_headers  # drip the status line and headers too
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.requests.append((self.path, self.headers.get("Authorization")))
                body = server._body(self.path)
                if body is None:
                    self.send_error(404)
                    return
                head = (
                    f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode()
                try:
                    self._send(head, server.drip_headers)
                    self._send(body, server.drip_s > 0)
                except OSError:
                    pass  # the client gave up

            def _send(self, data: bytes, drip: bool) -> None:
                if not drip:
                    self.wfile.write(data)
                    return
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(server.drip_s or 0.5)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def _body(self, path: str) -> bytes | None:
        parts = path.split("/")  # /v1/models/<v>/manifest or /v1/models/<v>/files/<rel>
        if len(parts) < 5 or parts[1:3] != ["v1", "models"]:
            return None
        version = parts[3] if parts[3].startswith("v") else f"v{parts[3]}"
        rel = MANIFEST if parts[4] == "manifest" else "/".join(parts[5:])
        file = self.root / version / rel
        return file.read_bytes() if file.is_file() else None

    def tokens_seen(self) -> list[str]:
        with self._lock:
            return [auth for _, auth in self.requests if auth]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
