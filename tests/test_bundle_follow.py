"""Bundles reach every daemon: a follower pulls what another daemon announces, from its
server, catching up at start and retrying a publisher it could not reach."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import redis

from aftertune.daemon import bundle_follow
from aftertune.daemon.announce import announce
from aftertune.daemon.bundle_follow import BundleFollower, FollowConfig
from aftertune.daemon.embedded_redis import free_port
from aftertune.daemon.server import HttpServer, build_app
from aftertune.store.bundles import install, latest_version, new_staging_dir, published, set_latest
from aftertune.store.consumer.format import manifest_sha256, write_manifest

STREAM = "aftertune:promotions"


def _publish(bundles: Path, version: int) -> None:
    staging = new_staging_dir(bundles, version)
    (staging / "model.onnx").write_bytes(random.Random(version).randbytes(4096))
    (staging / "tokenizer.json").write_text(json.dumps({"seed": version}))
    write_manifest(staging, {"name": "t", "version": version, "format": "onnx-logits"})
    install(staging, bundles, version)
    set_latest(bundles, version)


def _app(bundles: Path) -> object:
    registry = prometheus_client.CollectorRegistry()
    return build_app(bundles, token=None, ready=lambda: True, metrics=registry)


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Daemon a's bundles and the URL its server answers on."""
    bundles = tmp_path / "a" / "bundles"
    _publish(bundles, 1)
    server = HttpServer(_app(bundles), "127.0.0.1", 0)
    server.start()
    try:
        yield bundles, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop(timeout=5)


def _wait(probe: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_a_late_daemon_catches_up_then_follows_and_retries_an_unreachable_publisher(
    publisher: tuple[Path, str],
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bundle_follow, "RETRY_S", 0.2)
    a_bundles, url = publisher
    announce(redis_client, STREAM, published(a_bundles, 1), publisher="a", server=url)
    mine = tmp_path / "b" / "bundles"
    follower = BundleFollower(redis_client, FollowConfig(STREAM, mine, me="b", token=None, keep=5))
    follower.start()  # catches up with v1 before it returns
    try:
        assert latest_version(mine) == 1
        assert manifest_sha256(mine / "v1") == manifest_sha256(a_bundles / "v1")

        # Our own announcement is not pulled; another daemon's v2 is, from an address that
        # does not answer yet: it is tried again until it does.
        announce(redis_client, STREAM, published(mine, 1), publisher="b", server=url)
        _publish(a_bundles, 2)
        dead = f"http://127.0.0.1:{free_port()}"
        announce(redis_client, STREAM, published(a_bundles, 2), publisher="a", server=dead)
        _wait(lambda: follower._unfollowed is not None)
        assert latest_version(mine) == 1
        late = HttpServer(_app(a_bundles), "127.0.0.1", int(dead.rsplit(":", 1)[1]))
        late.start()  # the publisher's server comes up: the next retry pulls v2
        try:
            _wait(lambda: latest_version(mine) == 2)
        finally:
            late.stop(timeout=5)
        assert follower.pulled == [1, 2]
    finally:
        follower.stop()
