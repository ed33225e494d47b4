"""The read-only HTTP server: a real uvicorn on a free port, real HTTP, real bundles on disk."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import random
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from aftertune.daemon.errors import ServerError
from aftertune.daemon.metrics import DaemonMetrics
from aftertune.daemon.server import HttpServer, build_app
from aftertune.store.bundle_audit import BundleAudit
from aftertune.store.bundles import install, new_staging_dir, set_latest
from aftertune.store.consumer.format import MANIFEST, write_manifest
from aftertune.store.files import file_sha256

TOKEN = "s3cret-token"
MODEL_BYTES = 200_000  # larger than one 64 KiB chunk, so downloads stream in several


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Running:
    port: int
    ready: threading.Event

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
        """One request, the path sent exactly as given (no client-side normalising)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def auth_get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return self.get(path, {"Authorization": f"Bearer {TOKEN}", **(headers or {})})


def publish(bundles_dir: Path, version: int, seed: int) -> bytes:
    """A real bundle v<version>: model.onnx of random bytes, tokenizer.json, a manifest."""
    staging = new_staging_dir(bundles_dir, version)
    model = random.Random(seed).randbytes(MODEL_BYTES)
    (staging / "model.onnx").write_bytes(model)
    (staging / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
    write_manifest(
        staging, {"name": "t", "version": version, "format": "onnx-logits", "precision": "fp32"}
    )
    install(staging, bundles_dir, version)
    set_latest(bundles_dir, version)
    return model


def publish_two(bundles_dir: Path) -> Path:
    publish(bundles_dir, 1, seed=1)
    publish(bundles_dir, 2, seed=2)
    return bundles_dir


@contextlib.contextmanager
def running(
    bundles_dir: Path,
    registry: prometheus_client.CollectorRegistry,
    token: str | None = TOKEN,
    audit: BundleAudit | None = None,
) -> Iterator[Running]:
    ready = threading.Event()
    app = build_app(bundles_dir, token=token, ready=ready.is_set, metrics=registry, audit=audit)
    server = HttpServer(app, "127.0.0.1", 0)
    server.start()
    try:
        yield Running(server.port, ready)
    finally:
        server.stop(timeout=5)


@pytest.fixture(scope="module")
def registry() -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter(
        "aftertune_test_records", "records seen by the test", registry=registry
    ).inc(3)
    return registry


@pytest.fixture(scope="module")
def shared_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bundles v1 and v2 that no test changes, beside a file no request may reach."""
    root = tmp_path_factory.mktemp("shared")
    (root / "secret.txt").write_text("do not serve")
    return publish_two(root / "bundles")


@pytest.fixture(scope="module")
def server(
    shared_bundles: Path, registry: prometheus_client.CollectorRegistry
) -> Iterator[Running]:
    """One server for the tests that only read; starting one per test costs 0.2 s each."""
    with running(shared_bundles, registry) as server:
        yield server


@pytest.fixture
def bundles_dir(tmp_path: Path) -> Path:
    """Bundles v1 and v2 of this test's own, free to change."""
    return publish_two(tmp_path / "bundles")


@pytest.fixture
def serve(registry: prometheus_client.CollectorRegistry) -> Iterator[Callable[..., Running]]:
    """Start servers of this test's own; each is stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(bundles_dir: Path, token: str | None = TOKEN) -> Running:
            return stack.enter_context(running(bundles_dir, registry, token))

        yield start


def test_healthz_needs_no_token_and_readyz_follows_ready(
    serve: Callable[..., Running], bundles_dir: Path
) -> None:
    server = serve(bundles_dir)
    health = server.get("/healthz")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    not_ready = server.get("/readyz")
    assert (not_ready.status, not_ready.json()) == (503, {"status": "not ready"})
    server.ready.set()
    ready = server.get("/readyz")
    assert (ready.status, ready.json()) == (200, {"status": "ready"})


def test_models_lists_bundles_ascending_with_latest(server: Running, shared_bundles: Path) -> None:
    reply = server.auth_get("/v1/models")
    assert reply.status == 200
    listing = reply.json()
    assert listing["latest"] == 2
    assert [m["version"] for m in listing["models"]] == [1, 2]
    for model in listing["models"]:
        version_dir = shared_bundles / f"v{model['version']}"
        on_disk = json.loads((version_dir / MANIFEST).read_bytes())
        assert model == {
            "version": model["version"],
            "manifest_sha256": file_sha256(version_dir / MANIFEST),
            "created_at": on_disk["created_at"],
            "format": "onnx-logits",
            "precision": "fp32",
        }


def test_latest_model_returns_its_manifest(server: Running, shared_bundles: Path) -> None:
    reply = server.auth_get("/v1/models/latest")
    assert reply.status == 200
    assert reply.json() == {
        "version": 2,
        "manifest_sha256": file_sha256(shared_bundles / "v2" / MANIFEST),
        "manifest": json.loads((shared_bundles / "v2" / MANIFEST).read_bytes()),
    }


def test_nothing_published_lists_empty_and_latest_is_404(
    serve: Callable[..., Running], tmp_path: Path
) -> None:
    server = serve(tmp_path / "no-bundles")
    listing = server.auth_get("/v1/models")
    assert (listing.status, listing.json()) == (200, {"latest": None, "models": []})
    latest = server.auth_get("/v1/models/latest")
    assert latest.status == 404
    assert latest.json() == {"detail": "no model is published yet"}
    manifest = server.auth_get("/v1/models/latest/manifest")
    assert manifest.status == 404


@pytest.mark.parametrize(("version", "expected"), [("1", 1), ("v1", 1), ("latest", 2)])
def test_manifest_is_served_byte_for_byte_with_its_sha256_as_etag(
    server: Running, shared_bundles: Path, version: str, expected: int
) -> None:
    on_disk = (shared_bundles / f"v{expected}" / MANIFEST).read_bytes()
    reply = server.auth_get(f"/v1/models/{version}/manifest")
    assert reply.status == 200
    assert reply.body == on_disk
    assert reply.headers["Content-Type"] == "application/json"
    etag = f'"{hashlib.sha256(on_disk).hexdigest()}"'
    assert reply.headers["ETag"] == etag
    cached = server.auth_get(f"/v1/models/{version}/manifest", {"If-None-Match": etag})
    assert (cached.status, cached.body) == (304, b"")


def test_file_download_matches_disk_and_manifest_sha256(
    server: Running, shared_bundles: Path
) -> None:
    on_disk = (shared_bundles / "v1" / "model.onnx").read_bytes()
    manifest = json.loads((shared_bundles / "v1" / MANIFEST).read_bytes())
    reply = server.auth_get("/v1/models/v1/files/model.onnx")
    assert reply.status == 200
    assert reply.body == on_disk
    assert len(on_disk) == MODEL_BYTES
    assert reply.headers["Content-Length"] == str(MODEL_BYTES)
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["ETag"] == f'"{manifest["files"]["model.onnx"]["sha256"]}"'
    assert reply.headers["ETag"] == f'"{hashlib.sha256(reply.body).hexdigest()}"'


def test_latest_resolves_to_the_latest_bundles_file(server: Running, shared_bundles: Path) -> None:
    reply = server.auth_get("/v1/models/latest/files/tokenizer.json")
    assert reply.status == 200
    assert reply.body == (shared_bundles / "v2" / "tokenizer.json").read_bytes()
    assert json.loads(reply.body)["seed"] == 2


def test_if_none_match_gives_304_and_a_stale_tag_the_file(server: Running) -> None:
    etag = server.auth_get("/v1/models/1/files/model.onnx").headers["ETag"]
    cached = server.auth_get("/v1/models/1/files/model.onnx", {"If-None-Match": etag})
    assert (cached.status, cached.body, cached.headers["ETag"]) == (304, b"", etag)
    weak = server.auth_get("/v1/models/1/files/model.onnx", {"If-None-Match": f'"x", W/{etag}'})
    assert weak.status == 304
    stale = server.auth_get("/v1/models/1/files/model.onnx", {"If-None-Match": '"deadbeef"'})
    assert (stale.status, len(stale.body)) == (200, MODEL_BYTES)


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=10-19", 10, 20),
        ("bytes=0-0", 0, 1),
        ("bytes=70000-140000", 70_000, 140_001),  # spans chunk boundaries
        (f"bytes={MODEL_BYTES - 5}-", MODEL_BYTES - 5, MODEL_BYTES),
        ("bytes=-7", MODEL_BYTES - 7, MODEL_BYTES),
        (f"bytes=100-{MODEL_BYTES + 50}", 100, MODEL_BYTES),  # end past EOF is clamped
    ],
)
def test_range_returns_exactly_those_bytes(
    server: Running, shared_bundles: Path, header: str, start: int, end: int
) -> None:
    on_disk = (shared_bundles / "v1" / "model.onnx").read_bytes()
    reply = server.auth_get("/v1/models/1/files/model.onnx", {"Range": header})
    assert reply.status == 206
    assert reply.body == on_disk[start:end]
    assert reply.headers["Content-Range"] == f"bytes {start}-{end - 1}/{MODEL_BYTES}"
    assert reply.headers["Content-Length"] == str(end - start)


@pytest.mark.parametrize(
    "header", [f"bytes={MODEL_BYTES}-", f"bytes={MODEL_BYTES + 10}-{MODEL_BYTES + 20}"]
)
def test_range_past_the_end_is_416(server: Running, header: str) -> None:
    reply = server.auth_get("/v1/models/1/files/model.onnx", {"Range": header})
    assert reply.status == 416
    assert reply.headers["Content-Range"] == f"bytes */{MODEL_BYTES}"


def test_head_gives_headers_without_body(server: Running) -> None:
    reply = server.get(
        "/v1/models/1/files/model.onnx", {"Authorization": f"Bearer {TOKEN}"}, method="HEAD"
    )
    assert (reply.status, reply.body) == (200, b"")
    assert reply.headers["Content-Length"] == str(MODEL_BYTES)


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/models/1/manifest", "/v1/models/1/files/model.onnx", "/metrics"]
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer"])
def test_token_is_required_on_v1_and_metrics(
    server: Running, path: str, authorization: str | None
) -> None:
    reply = server.get(path, {"Authorization": authorization} if authorization else {})
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert "bearer token" in reply.json()["detail"]
    assert server.auth_get(path).status == 200


def test_without_a_token_v1_is_open(serve: Callable[..., Running], bundles_dir: Path) -> None:
    server = serve(bundles_dir, token=None)
    assert server.get("/v1/models").status == 200
    assert server.get("/metrics").status == 200


def test_metrics_exposes_the_registry(server: Running) -> None:
    reply = server.auth_get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert "aftertune_test_records_total 3.0" in reply.body.decode().splitlines()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/1/files/../../secret.txt",
        "/v1/models/1/files/%2e%2e/%2e%2e/secret.txt",
        "/v1/models/1/files/..%2F..%2Fsecret.txt",
        "/v1/models/1/files/tokenizer.json/../model.onnx",
        "/v1/models/1/files//etc/passwd",
        "/v1/models/1/files/%2Fetc%2Fpasswd",
        "/v1/models/1/files/",
    ],
)
def test_escaping_paths_are_refused(server: Running, path: str) -> None:
    reply = server.auth_get(path)
    assert reply.status == 400
    assert b"do not serve" not in reply.body
    assert "refused path" in reply.json()["detail"]


def test_only_files_the_manifest_lists_are_served(
    serve: Callable[..., Running], bundles_dir: Path
) -> None:
    server = serve(bundles_dir)
    (bundles_dir / "v1" / "extra.bin").write_bytes(b"not in the manifest")
    for name in ("extra.bin", MANIFEST, "missing.bin"):
        reply = server.auth_get(f"/v1/models/1/files/{name}")
        assert reply.status == 404, name
        assert "manifest lists" in reply.json()["detail"]


def test_a_listed_file_linking_out_of_the_bundle_is_not_served(
    serve: Callable[..., Running], bundles_dir: Path, tmp_path: Path
) -> None:
    server = serve(bundles_dir)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    listed = bundles_dir / "v1" / "tokenizer.json"
    listed.unlink()
    listed.symlink_to(secret)
    reply = server.auth_get("/v1/models/1/files/tokenizer.json")
    assert reply.status == 404
    assert b"do not serve" not in reply.body


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/models/9/manifest", 404),
        ("/v1/models/v9/files/model.onnx", 404),
        ("/v1/models/x9/manifest", 400),
        ("/v1/models/-1/files/model.onnx", 400),
        # Before: a 3000-digit version was a 500, and ARABIC-INDIC DIGIT ONE served v1.
        (f"/v1/models/{'9' * 3000}/manifest", 400),
        (f"/v1/models/v{'9' * 3000}/files/model.onnx", 400),
        ("/v1/models/v%D9%A1/manifest", 400),
        ("/v1/models/%D9%A1/files/model.onnx", 400),
        ("/v1/models/0/manifest", 400),
        ("/v1/models/1234567890/manifest", 400),
        ("/v1/models/999999999/manifest", 404),
    ],
)
def test_unknown_version_is_404_and_malformed_is_400(
    server: Running, path: str, status: int
) -> None:
    reply = server.auth_get(path)
    assert reply.status == status
    assert reply.json()["detail"]


def test_a_bundle_whose_manifest_does_not_read_goes_out_of_service(
    serve: Callable[..., Running], bundles_dir: Path
) -> None:
    server = serve(bundles_dir)
    (bundles_dir / "v1" / MANIFEST).write_text("{not json")
    reply = server.auth_get("/v1/models/1/manifest")
    assert reply.status == 404
    assert "bundle v1 is damaged and out of service" in reply.json()["detail"]
    assert [m["version"] for m in server.auth_get("/v1/models").json()["models"]] == [2]
    assert (bundles_dir / ".damaged-v1" / MANIFEST).read_text() == "{not json"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def audited(
    bundles_dir: Path,
) -> Iterator[tuple[Running, BundleAudit, DaemonMetrics]]:
    """A server sharing its verdicts and the damage counter the way the daemon does."""
    metrics = DaemonMetrics()
    audit = BundleAudit(bundles_dir, on_damaged=lambda v, why: metrics.bundles_damaged.inc())
    with running(bundles_dir, metrics.registry, audit=audit) as server:
        yield server, audit, metrics


def _damaged_count(server: Running) -> str:
    lines = server.auth_get("/metrics").body.decode().splitlines()
    return next(line for line in lines if line.startswith("aftertune_bundles_damaged_total"))


def test_a_corrupt_file_is_never_served_and_its_bundle_goes_out_of_service(
    audited: tuple[Running, BundleAudit, DaemonMetrics],
    bundles_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: /v1/models listed v2 and model.onnx was served with the manifest's ETag.
    server, _, _ = audited
    _flip_byte(bundles_dir / "v2" / "model.onnx")
    replies = [server.auth_get("/v1/models/2/files/model.onnx") for _ in range(3)]
    assert [r.status for r in replies] == [404, 404, 404]
    assert not any("ETag" in r.headers for r in replies)
    assert "bundle v2 is damaged and out of service" in replies[0].json()["detail"]
    assert "model v2 is not published" in replies[2].json()["detail"]
    listing = server.auth_get("/v1/models").json()
    assert listing["latest"] is None and [m["version"] for m in listing["models"]] == [1]
    for path in ("/v1/models/latest", "/v1/models/2/manifest", "/v1/models/latest/manifest"):
        assert server.auth_get(path).status == 404, path
    assert (bundles_dir / ".damaged-v2" / "model.onnx").is_file()  # kept for inspection
    damaged = [r for r in caplog.records if "bundle v2 is damaged" in r.getMessage()]
    assert len(damaged) == 1 and damaged[0].levelname == "ERROR"
    assert _damaged_count(server) == "aftertune_bundles_damaged_total 1.0"
    assert server.auth_get("/v1/models/1/files/model.onnx").status == 200  # v1 is whole


def test_a_file_changed_after_it_was_served_is_checked_again(
    audited: tuple[Running, BundleAudit, DaemonMetrics], bundles_dir: Path
) -> None:
    server, _, _ = audited
    first = server.auth_get("/v1/models/1/files/model.onnx")
    assert first.status == 200
    _flip_byte(bundles_dir / "v1" / "model.onnx")
    again = server.auth_get("/v1/models/1/files/model.onnx")
    assert again.status == 404
    assert hashlib.sha256(again.body).hexdigest() not in first.headers["ETag"]


def test_a_sweep_takes_a_damaged_bundle_out_before_anyone_asks(
    audited: tuple[Running, BundleAudit, DaemonMetrics], bundles_dir: Path
) -> None:
    server, audit, _ = audited
    assert audit.sweep(rehash=True) == {}
    _flip_byte(bundles_dir / "v1" / "tokenizer.json")
    (bundles_dir / "v2" / "model.onnx").unlink()
    failed = audit.sweep()
    assert sorted(failed) == [1, 2]
    assert "tokenizer.json: sha256" in failed[1] and "model.onnx" in failed[2]
    assert server.auth_get("/v1/models").json() == {"latest": None, "models": []}
    assert audit.sweep() == {}  # counted and logged once
    assert _damaged_count(server) == "aftertune_bundles_damaged_total 2.0"


def test_an_empty_token_is_refused(
    bundles_dir: Path, registry: prometheus_client.CollectorRegistry
) -> None:
    with pytest.raises(ValueError, match="token must not be empty"):
        build_app(bundles_dir, token="", ready=lambda: True, metrics=registry)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/models"), ("DELETE", "/v1/models/1/files/model.onnx"), ("PUT", "/healthz")],
)
def test_server_is_read_only(server: Running, method: str, path: str) -> None:
    reply = server.get(path, {"Authorization": f"Bearer {TOKEN}"}, method=method)
    assert reply.status == 405


def test_port_in_use_names_host_and_port(
    bundles_dir: Path, registry: prometheus_client.CollectorRegistry
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        app = build_app(bundles_dir, token=None, ready=lambda: True, metrics=registry)
        with pytest.raises(ServerError, match=f"127.0.0.1:{port}"):
            HttpServer(app, "127.0.0.1", port).start()


def test_stop_closes_the_port(
    bundles_dir: Path, registry: prometheus_client.CollectorRegistry
) -> None:
    app = build_app(bundles_dir, token=None, ready=lambda: True, metrics=registry)
    server = HttpServer(app, "127.0.0.1", 0)
    server.start()
    assert Running(server.port, threading.Event()).get("/healthz").status == 200
    server.stop(timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
