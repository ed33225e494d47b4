"""The daemon's read-only HTTP server: health, readiness, metrics and bundle downloads.

    GET /healthz                              liveness, no token
    GET /readyz                               200 once ``ready()`` holds, else 503; no token
    GET /metrics                              Prometheus text exposition
    GET /v1/models                            published bundles, ascending, and which is latest
    GET /v1/models/latest                     the latest bundle's manifest
    GET /v1/models/candidate                  the challenger in shadow evaluation, if any
    GET /v1/models/{version}/manifest         manifest.json as on disk; ETag = its sha256
    GET /v1/models/{version}/files/{path}     one file the manifest lists; ETag, Range, HEAD

``{version}`` is ``3``, ``v3`` or ``latest``. With a token, /v1 and /metrics need
``Authorization: Bearer <token>``. Only files a manifest lists are served, and only from
inside their bundle directory. uvicorn runs in a thread of its own; the daemon's main
thread keeps the signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import prometheus_client
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from uvicorn.protocols.http.h11_impl import H11Protocol

from aftertune.daemon.errors import ServerError
from aftertune.store.bundle_audit import BundleAudit
from aftertune.store.bundles import LATEST, Published, latest_version, published, published_versions
from aftertune.store.consumer.format import (
    MANIFEST,
    manifest_sha256,
    parse_version,
    safe_relpath,
    version_dir_name,
)
from aftertune.store.errors import BundleError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0

# What one client may hold. uvicorn's keep-alive timer runs only between a response and the
# next byte, so without a deadline of our own a client that connects and sends nothing, or
# sends a header line every few seconds (slowloris), keeps its connection for ever.
REQUEST_TIMEOUT_S = 10.0  # to send a whole request, from connect or from the last response
KEEP_ALIVE_S = 5  # idle time allowed between requests on one connection
MAX_CONNECTIONS = 1000  # open connections beyond it: requests answered 503 at once
MAX_REQUEST_HEAD_BYTES = 16 * 1024  # a longer request line + headers: 400
MAX_LATEST_WAIT_S = 120.0  # longest long poll of /v1/models/latest?wait=S
LATEST_POLL_S = 0.25  # how often a long poll looks at `latest` again


class ModelSummary(BaseModel):
    version: int
    manifest_sha256: str
    created_at: str | None
    format: str | None
    precision: str | None


class ModelList(BaseModel):
    latest: int | None
    models: list[ModelSummary]


class LatestModel(BaseModel):
    version: int
    manifest_sha256: str
    manifest: dict[str, Any]


def _find(
    bundles_dir: Path,
    version: str,
    audit: BundleAudit,
    explain: Callable[[int], str] | None = None,
) -> Published:
    """The published bundle a URL names ('3', 'v3' or 'latest'), or the HTTP error to answer."""
    if version == LATEST:
        number = latest_version(bundles_dir)
        if number is None:
            raise HTTPException(404, "no model is published yet")
    else:
        try:
            number = parse_version(version)
        except BundleError as exc:
            raise HTTPException(400, str(exc)) from None
    if not (bundles_dir / version_dir_name(number) / MANIFEST).is_file():
        why = explain(number) if explain is not None else f"model v{number} is not published"
        raise HTTPException(404, f"{why}; GET /v1/models lists the published ones")
    try:
        return published(bundles_dir, number)
    except BundleError as exc:
        # The bundle is there but its manifest does not read: out of service from now on.
        with contextlib.suppress(OSError):  # unless it went meanwhile
            damaged = bundles_dir / version_dir_name(number)
            audit.take_out_of_service(number, manifest_sha256(damaged), str(exc))
        raise HTTPException(404, f"bundle v{number} is damaged and out of service") from None


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match names ``etag`` (weak comparison, as RFC 9110 asks for this header)."""
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


def _bearer_check(token: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = None if token is None else token.encode()

    # async although it awaits nothing: FastAPI runs a plain-def dependency on a worker
    # thread, a hand-off per request that cost the answer server ~6% of its CPU.
    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Headers arrive latin-1 decoded; encoding back gives the bytes the client sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("latin-1", "replace"), expected
        ):
            raise HTTPException(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <server.token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def build_app(
    bundles_dir: Path,
    *,
    token: str | None,
    ready: Callable[[], bool],
    metrics: prometheus_client.CollectorRegistry,
    audit: BundleAudit | None = None,
    explain: Callable[[int], str] | None = None,
    candidate: Callable[[], int | None] | None = None,
) -> FastAPI:
    """The read-only app over ``bundles_dir``; ``token`` guards /v1 and /metrics when set.

    ``audit`` holds the verdicts on published files (the daemon shares its own with its
    sweeps); a file is hashed before it is first served and whenever it changed on disk.
    ``explain(version)`` says why a version has no bundle (rejected, pruned...) in a 404.
    ``candidate()`` names the version in shadow evaluation (None: none), for answer servers.
    """
    if token == "":
        # An empty token would leave the server open while the operator believes it guarded.
        raise ValueError("token must not be empty; leave it unset to serve without one")
    app = FastAPI(title="aftertune", docs_url=None, redoc_url=None, openapi_url=None)
    guarded = [Depends(_bearer_check(token))]
    app.include_router(_probe_routes(ready))
    app.include_router(_metrics_routes(metrics), dependencies=guarded)
    audit = audit or BundleAudit(Path(bundles_dir))
    routes = _model_routes(Path(bundles_dir), audit, explain)
    app.include_router(routes, prefix="/v1", dependencies=guarded)
    shadow = _candidate_route(Path(bundles_dir), audit, candidate)
    app.include_router(shadow, prefix="/v1", dependencies=guarded)
    return app


def _probe_routes(ready: Callable[[], bool]) -> APIRouter:
    """/healthz and /readyz, without a token: what a supervisor or load balancer polls."""
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        if ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    return router


def _metrics_routes(metrics: prometheus_client.CollectorRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    def metrics_text() -> Response:
        return Response(
            prometheus_client.generate_latest(metrics),
            media_type=prometheus_client.CONTENT_TYPE_LATEST,
        )

    return router


def _model_routes(
    bundles_dir: Path, audit: BundleAudit, explain: Callable[[int], str] | None
) -> APIRouter:
    """/models…: the published bundles, their manifests and the files they list."""
    router = APIRouter()

    @router.get("/models")
    def list_models() -> ModelList:
        return _model_list(bundles_dir)

    @router.get("/models/latest", response_model=None)
    async def latest_model(request: Request, wait: float = 0.0) -> LatestModel | Response:
        """The latest bundle, its manifest's sha256 as ETag. With If-None-Match naming it and
        ``wait`` > 0 (seconds, at most MAX_LATEST_WAIT_S): a long poll, answered as soon as
        ``latest`` moves, or 304 once ``wait`` passed (``aftertune pull --follow``)."""
        if not 0 <= wait <= MAX_LATEST_WAIT_S:
            raise HTTPException(400, f"wait must be between 0 and {MAX_LATEST_WAIT_S:g} seconds")
        deadline = time.monotonic() + wait
        if_none_match = request.headers.get("if-none-match")
        bundle = _find(bundles_dir, LATEST, audit)
        etag = f'"{bundle.manifest_sha256}"'
        while _etag_matches(if_none_match, etag):
            # async: a waiting follower holds no worker thread, only this coroutine; it
            # looks at the `latest` link (one readlink) until it moves.
            while latest_version(bundles_dir) == bundle.version:
                if time.monotonic() >= deadline or await request.is_disconnected():
                    return Response(status_code=304, headers={"ETag": etag})
                await asyncio.sleep(LATEST_POLL_S)
            bundle = _find(bundles_dir, LATEST, audit)
            etag = f'"{bundle.manifest_sha256}"'
        body = LatestModel(
            version=bundle.version,
            manifest_sha256=bundle.manifest_sha256,
            manifest=bundle.manifest,
        )
        return JSONResponse(body.model_dump(), headers={"ETag": etag})

    @router.get("/models/{version}/manifest")
    def manifest(version: str, request: Request) -> Response:
        bundle = _find(bundles_dir, version, audit, explain)
        etag = f'"{bundle.manifest_sha256}"'
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers={"ETag": etag})
        body = (bundle.path / MANIFEST).read_bytes()
        return Response(body, media_type="application/json", headers={"ETag": etag})

    @router.api_route("/models/{version}/files/{path:path}", methods=["GET", "HEAD"])
    def bundle_file(version: str, path: str, request: Request) -> Response:
        return _file_response(bundles_dir, audit, version, path, request, explain)

    return router


def _candidate_route(
    bundles_dir: Path, audit: BundleAudit, candidate: Callable[[], int | None] | None
) -> APIRouter:
    """/models/candidate: the challenger answer servers shadow (``answer-server --shadow``)."""
    router = APIRouter()

    @router.get("/models/candidate")
    def shadow_candidate() -> JSONResponse:
        version = candidate() if candidate is not None else None
        if version is None:
            raise HTTPException(
                404, "no challenger is in shadow evaluation (gate.shadow_requests) on this daemon"
            )
        bundle = _find(bundles_dir, str(version), audit)
        return JSONResponse(
            {"version": bundle.version, "manifest_sha256": bundle.manifest_sha256},
            headers={"ETag": f'"{bundle.manifest_sha256}"'},
        )

    return router


def _model_list(bundles_dir: Path) -> ModelList:
    models = []
    for version in published_versions(bundles_dir):
        try:
            bundle = published(bundles_dir, version)
        except (BundleError, OSError) as exc:
            log.warning("not listing bundle v%d: %s", version, exc)
            continue
        m = bundle.manifest
        models.append(
            ModelSummary(
                version=bundle.version,
                manifest_sha256=bundle.manifest_sha256,
                created_at=m.get("created_at"),
                format=m.get("format"),
                precision=m.get("precision"),
            )
        )
    return ModelList(latest=latest_version(bundles_dir), models=models)


def _file_response(
    bundles_dir: Path,
    audit: BundleAudit,
    version: str,
    path: str,
    request: Request,
    explain: Callable[[int], str] | None = None,
) -> Response:
    """One file a bundle's manifest lists, with its sha256 as ETag once its bytes match it."""
    try:
        rel = safe_relpath(path)
    except BundleError as exc:
        raise HTTPException(400, str(exc)) from None
    bundle = _find(bundles_dir, version, audit, explain)
    entry = bundle.manifest["files"].get(rel)
    root = bundle.path.resolve()
    real = (root / rel).resolve()
    # A listed file that is a symlink out of the bundle is refused like an unlisted one.
    if entry is None or not real.is_relative_to(root) or not real.is_file():
        raise HTTPException(
            404, f"{rel!r} is not a file of bundle v{bundle.version}; its manifest lists them"
        )
    try:
        real = audit.verified_file(bundle.version, bundle.path, bundle.manifest_sha256, rel, entry)
    except BundleError as exc:
        raise HTTPException(
            404, f"bundle v{bundle.version} is damaged and out of service: {exc}"
        ) from None
    etag = f'"{entry["sha256"]}"'
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    # FileResponse streams in chunks and answers Range (206, 416) and HEAD itself.
    return FileResponse(real, stat_result=real.stat(), headers={"ETag": etag})


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a ServerError that names it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc}; check server.host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServerError(
            f"cannot listen on {host}:{port}: {exc.strerror}; another process may hold the "
            "port: stop it or set server.port to a free one"
        ) from None
    return sock


class _RequestDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline to receive each request.

    Armed when the connection opens and after each response; when it passes and the
    client has not sent its whole request, the connection is closed. A request already
    received is never cut, however long its answer (a download) takes.
    """

    request_timeout_s = REQUEST_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None
    _head_bytes = 0  # of the request head being received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        """The request line and headers are capped in total, however they arrive: h11's own
        limit holds only for a head still incomplete after a read, so 70 KB of headers in
        one read used to pass."""
        if self.conn.their_state is h11.IDLE:
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self._refuse_head()
                return
        super().data_received(data)

    def _refuse_head(self) -> None:
        """431, written raw (h11 sends no response before a request is read), then close."""
        body = f"request line and headers past {MAX_REQUEST_HEAD_BYTES} bytes\n".encode()
        head = (
            "HTTP/1.1 431 Request Header Fields Too Large\r\n"
            "content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        if not self.transport.is_closing():
            self.transport.write(head.encode() + body)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_bytes = 0
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._deadline_passed)

    def _deadline_passed(self) -> None:
        receiving = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        if receiving and not self.transport.is_closing():
            log.debug(
                "closing a connection that sent no whole request in %.0fs", self.request_timeout_s
            )
            self.transport.close()


class HttpServer:
    """uvicorn serving ``app`` in a daemon thread; the caller's thread keeps the signals."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        keep_alive_s: int = KEEP_ALIVE_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host = host
        self._port = port
        protocol = type(
            "RequestDeadline", (_RequestDeadline,), {"request_timeout_s": request_timeout_s}
        )
        # log_config=None: the daemon configured logging already. lifespan off: the app has none.
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http=protocol,
            timeout_keep_alive=keep_alive_s,
            limit_concurrency=max_connections,
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound once started (port 0 picks a free one); before, the one asked."""
        return self._port

    def start(self) -> None:
        """Bind, run uvicorn in a thread and return once it accepts connections."""
        sock = _listen(self.host, self._port)
        self._port = sock.getsockname()[1]
        # uvicorn installs signal handlers only on the main thread; this one is not.
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                sock.close()
                raise ServerError(
                    f"the HTTP server on {self.host}:{self._port} did not start; see the log above"
                )
            time.sleep(0.01)
        log.info("serving HTTP on http://%s:%d", self.host, self._port)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish requests in flight (up to ``timeout`` seconds), then close."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(1.0)
        if self._thread.is_alive():
            log.warning("the HTTP server thread did not stop within %.1f s", timeout + 1.0)
        self._thread = None
