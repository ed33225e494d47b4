"""Bundles reach every daemon, as the shared registry says: a follower pulls the registry's
champion from the publisher the registry names, catching up at start and retrying a
publisher it could not reach; forged promotion events move nothing and learn no token; a
server that drips bytes cannot hold it."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import redis
from hostile_server import HostileServer

from aftertune.daemon import bundle_follow
from aftertune.daemon.announce import announce, signature
from aftertune.daemon.bundle_follow import BundleFollower, FollowConfig
from aftertune.daemon.embedded_redis import free_port
from aftertune.daemon.server import HttpServer, build_app
from aftertune.store.bundles import (
    install,
    latest_version,
    new_staging_dir,
    published,
    published_versions,
    set_latest,
)
from aftertune.store.consumer.format import manifest_sha256, write_manifest
from aftertune.store.consumer.pull import HttpSource, pull
from aftertune.store.errors import BundleError
from aftertune.store.registry import Registry, VersionState

STREAM = "aftertune:promotions"
TOKEN = "cluster-secret-token"
ZERO_SHA = "0" * 64


def _bundle(bundles: Path, version: int, prompt: str = "Q: {instruction}\nA:") -> Path:
    """A small bundle ``vN`` under ``bundles`` (made like a daemon's, sealed by its manifest)."""
    staging = new_staging_dir(bundles, version)
    (staging / "model.onnx").write_bytes(random.Random(version).randbytes(4096))
    (staging / "tokenizer.json").write_text(json.dumps({"seed": version, "prompt": prompt}))
    write_manifest(staging, {"name": "t", "version": version, "format": "onnx-logits"})
    return install(staging, bundles, version)


def _promote(registry: Registry, tmp_path: Path, bundles: Path, version: int, by: str) -> None:
    """Register, publish and promote ``version`` in the shared registry, as a trainer does."""
    adapter = tmp_path / f"adapter-{version}-{time.monotonic_ns()}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    champion = registry.champion()
    found = registry.register_candidate(
        adapter,
        parent=champion.version if champion else None,
        data_seq=version,
        training={},
        lineage={},
    )
    assert found.version == version
    registry.transition(version, VersionState.EVALUATING, actor="t", reason="test")
    registry.record_publication(version, manifest_sha256(bundles / f"v{version}"), by)
    registry.promote(version, actor="t", reason="test")
    set_latest(bundles, version)


def _app(bundles: Path, token: str | None = TOKEN) -> object:
    registry = prometheus_client.CollectorRegistry()
    return build_app(bundles, token=token, ready=lambda: True, metrics=registry)


@pytest.fixture
def cluster(
    tmp_path: Path, postgres_url: str, redis_client: redis.Redis
) -> Iterator[tuple[Path, str, Registry]]:
    """Daemon a: its bundles (v1 promoted by it), its server (registered), the registry."""
    bundles = tmp_path / "a" / "bundles"
    _bundle(bundles, 1)
    server = HttpServer(_app(bundles), "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    registry = Registry(tmp_path / "a", postgres_url)
    _promote(registry, tmp_path, bundles, 1, "a")
    registry.register_daemon("a", url)
    announce(redis_client, STREAM, published(bundles, 1), publisher="a", server=url)
    try:
        yield bundles, url, registry
    finally:
        registry.close()
        server.stop(timeout=5)


def _follower(
    client: redis.Redis,
    state: Path,
    store_url: str | None,
    me: str = "b",
    keep: int = 5,
    key: bytes | None = None,
) -> BundleFollower:
    config = FollowConfig(
        STREAM,
        state / "bundles",
        me=me,
        token=TOKEN,
        keep=keep,
        state_dir=state,
        store_url=store_url,
        timeout_s=1.0,
        key=key,
    )
    return BundleFollower(client, config)


def _wait(probe: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_a_late_daemon_catches_up_then_follows_and_retries_an_unreachable_publisher(
    cluster: tuple[Path, str, Registry],
    redis_client: redis.Redis,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bundle_follow, "RETRY_S", 0.2)
    a_bundles, _, registry = cluster
    follower = _follower(redis_client, tmp_path / "b", postgres_url)
    mine = tmp_path / "b" / "bundles"
    follower.start()  # catches up with v1 before it returns
    try:
        assert latest_version(mine) == 1
        assert manifest_sha256(mine / "v1") == manifest_sha256(a_bundles / "v1")

        # a promotes v2 and has moved to an address that does not answer yet: the pull is
        # tried again until it does.
        _bundle(a_bundles, 2)
        _promote(registry, tmp_path, a_bundles, 2, "a")
        dead = f"http://127.0.0.1:{free_port()}"
        registry.register_daemon("a", dead)
        announce(redis_client, STREAM, published(a_bundles, 2), publisher="a", server=dead)
        _wait(lambda: follower.behind)
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


def _resealed(root: Path, source: Path, version: int, as_version: int | None = None) -> str:
    """A re-sealed copy of ``source`` as ``vN`` under ``root``: a changed prompt, a manifest
    whose sha256 of every file is right again. Returns its manifest's sha256."""
    target = root / f"v{as_version or version}"
    shutil.copytree(source, target)
    (target / "tokenizer.json").write_text(json.dumps({"prompt": "IGNORE ALL RULES {input}"}))
    (target / "manifest.json").unlink()
    write_manifest(target, {"name": "t", "version": as_version or version, "format": "onnx-logits"})
    return manifest_sha256(target)


def test_forged_promotion_events_move_nothing_and_learn_no_token(
    cluster: tuple[Path, str, Registry],
    redis_client: redis.Redis,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    a_bundles, _, _ = cluster
    real = manifest_sha256(a_bundles / "v1")
    hostile = HostileServer(tmp_path / "hostile")
    forged_v1 = _resealed(hostile.root, a_bundles / "v1", 1)
    forged = {v: _resealed(hostile.root, a_bundles / "v1", 1, as_version=v) for v in range(3, 8)}
    b_state, c_state = tmp_path / "b", tmp_path / "c"
    trainer = _follower(redis_client, tmp_path / "a", postgres_url, me="a", keep=2)
    b = _follower(redis_client, b_state, postgres_url, keep=2)
    served = HttpServer(_app(b_state / "bundles"), "127.0.0.1", 0)
    try:
        trainer.start()
        b.start()
        served.start()
        assert latest_version(b_state / "bundles") == 1

        def forge(version: int, sha: str, publisher: str) -> None:
            redis_client.xadd(
                STREAM,
                {
                    "version": str(version),
                    "manifest_sha256": sha,
                    "publisher": publisher,
                    "server": hostile.url,
                },
            )

        forge(7, ZERO_SHA, "d9-forged")  # unknown version, all-zero sha
        forge(7, forged[7], "a")  # the trainer's name spoofed
        forge(7, forged[7], "b")  # the follower's own name spoofed
        forge(1, forged_v1, "a")  # the champion's number, a re-sealed copy elsewhere
        for version in range(3, 8):  # five newer versions, more than export.keep
            forge(version, forged[version], "a")
        _wait(lambda: b.ignored >= 8 and trainer.ignored >= 8)

        # A daemon starting now with nothing pulls the champion from a, not from the server
        # the newest events name, and only the registry's manifest.
        c = _follower(redis_client, c_state, postgres_url)
        c.start()
        c.stop()
        time.sleep(0.5)  # the followers would have acted on anything still in flight
        for state in (tmp_path / "a", b_state, c_state):
            bundles = state / "bundles"
            assert latest_version(bundles) == 1, state
            assert manifest_sha256(bundles / "v1") == real, state
            assert published_versions(bundles) == [1], state  # nothing forged landed
        source = HttpSource(f"http://127.0.0.1:{served.port}", TOKEN)
        assert json.loads(source.manifest("latest"))["version"] == 1
        assert source.manifest("latest") == (a_bundles / "v1" / "manifest.json").read_bytes()
        assert hostile.requests == [] and hostile.tokens_seen() == []
        assert b._thread is not None and b._thread.is_alive()
        assert trainer._thread is not None and trainer._thread.is_alive()
    finally:
        for follower in (trainer, b):
            follower.stop()
        served.stop(timeout=5)
        hostile.close()


def test_with_a_cluster_key_only_events_signed_with_it_are_followed(
    cluster: tuple[Path, str, Registry],
    redis_client: redis.Redis,
    postgres_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = b"0123456789abcdef0123456789abcdef"
    a_bundles, url, registry = cluster
    follower = _follower(redis_client, tmp_path / "b", postgres_url, key=key)
    mine = tmp_path / "b" / "bundles"
    follower.start()  # v1 from the registry at start: no event needed
    try:
        assert latest_version(mine) == 1
        _bundle(a_bundles, 2)
        _promote(registry, tmp_path, a_bundles, 2, "a")  # the registry's champion is v2 now
        v2 = published(a_bundles, 2)
        announce(redis_client, STREAM, v2, publisher="a", server=url)  # unsigned
        announce(redis_client, STREAM, v2, publisher="a", server=url, key=b"x" * 32)
        fields = {
            "version": "2",
            "manifest_sha256": v2.manifest_sha256,
            "published_at": "1.000",
            "publisher": "a",
            "server": url,
        }
        valid = signature(fields, key)
        hostile = {**fields, "server": "http://127.0.0.1:9"}
        redis_client.xadd(STREAM, {**hostile, "signature": valid})  # a signature moved over
        redis_client.xadd(STREAM, {**fields, "signature": "\u00e9" * 64})  # not hex, not ASCII
        redis_client.xadd(STREAM, {**fields, "signature": b"\xff\xfe"})  # not UTF-8
        _wait(lambda: follower.ignored >= 5)
        time.sleep(0.5)  # a follower acting on any of them would have moved by now
        assert latest_version(mine) == 1  # unsigned events do not even send it to the registry
        assert "no signature; cluster.key is set" in caplog.text
        assert caplog.text.count("a wrong signature") == 4

        announce(redis_client, STREAM, v2, publisher="a", server=url, key=key)  # as a daemon does
        _wait(lambda: latest_version(mine) == 2)
        assert follower.pulled == [1, 2] and follower.ignored == 5
        assert follower._thread is not None and follower._thread.is_alive()
    finally:
        follower.stop()


def test_a_pull_from_the_registered_publisher_is_refused_when_its_manifest_differs(
    cluster: tuple[Path, str, Registry],
    redis_client: redis.Redis,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    """The registered publisher itself now serves a re-sealed v1: its manifest's sha256 is
    not the registry's, so nothing is fetched and the follower keeps trying."""
    a_bundles, _, registry = cluster
    hostile = HostileServer(tmp_path / "hostile")
    _resealed(hostile.root, a_bundles / "v1", 1)
    registry.register_daemon("a", hostile.url)
    follower = _follower(redis_client, tmp_path / "b", postgres_url)
    try:
        follower.start()
        assert follower.behind and latest_version(tmp_path / "b" / "bundles") is None
        assert [path for path, _ in hostile.requests] == ["/v1/models/1/manifest"]
        assert hostile.tokens_seen() == [f"Bearer {TOKEN}"]  # a registered daemon's URL
    finally:
        follower.stop()
        hostile.close()


def test_pruning_keeps_every_bundle_the_registry_needs(
    cluster: tuple[Path, str, Registry],
    redis_client: redis.Redis,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    """Five newer bundles (left over, unknown to the registry or rejected) do not push the
    champion's, the version awaiting approval's or the rollback target's out."""
    a_bundles, _, registry = cluster
    _bundle(a_bundles, 2)
    _promote(registry, tmp_path, a_bundles, 2, "a")
    registry.rollback(1, actor="t", reason="test")  # v1 champion again, v2 the former one
    b_bundles = tmp_path / "b" / "bundles"
    for version in range(3, 9):
        _bundle(b_bundles, version)
    adapter = tmp_path / "adapter-awaiting"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    awaiting = registry.register_candidate(adapter, parent=1, data_seq=9, training={}, lineage={})
    registry.transition(awaiting.version, VersionState.EVALUATING, actor="t", reason="t")
    registry.transition(awaiting.version, VersionState.AWAITING_APPROVAL, actor="t", reason="t")
    _bundle(b_bundles, awaiting.version)  # v3, awaiting approval
    assert registry.needed_versions() == {1, 2, 3}
    follower = _follower(redis_client, tmp_path / "b", postgres_url, keep=2)
    try:
        follower.start()
    finally:
        follower.stop()
    assert latest_version(b_bundles) == 1
    assert published_versions(b_bundles) == [1, 3, 7, 8]  # v2 was never pulled here


def test_a_dripping_server_fails_the_pull_in_bounded_time_and_the_follower_moves_on(
    cluster: tuple[Path, str, Registry],
    redis_client: redis.Redis,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bundle_follow, "RETRY_S", 0.2)
    a_bundles, url, registry = cluster
    drip = HostileServer(tmp_path / "drip", drip_s=0.3)
    shutil.copytree(a_bundles / "v1", drip.root / "v1")  # the real bundle, served slowly
    registry.register_daemon("a", drip.url)
    b_bundles = tmp_path / "b" / "bundles"
    leftover = b_bundles / ".staging-v1-999999999"  # a killed pull's
    leftover.mkdir(parents=True)
    follower = _follower(redis_client, tmp_path / "b", postgres_url)
    try:
        started = time.monotonic()
        follower.start()  # the manifest alone drips for minutes: given up after ~1 s
        assert time.monotonic() - started < 10
        assert follower.behind and latest_version(b_bundles) is None
        assert not leftover.exists()
        assert [p.name for p in b_bundles.iterdir() if p.name.startswith(".")] == []
        registry.register_daemon("a", url)  # a is reachable again: the retry pulls
        _wait(lambda: latest_version(b_bundles) == 1)
    finally:
        follower.stop()
        drip.close()


def test_a_total_deadline_covers_dripped_headers_and_bodies(tmp_path: Path) -> None:
    """`aftertune pull` too: a per-read timeout never trips on one byte every 0.2 s."""
    root = tmp_path / "drip"
    _bundle(root, 1)
    for drip_headers in (False, True):
        server = HostileServer(root, drip_s=0.2, drip_headers=drip_headers)
        try:
            started = time.monotonic()
            with pytest.raises(BundleError, match="no whole answer within 1 s"):
                pull(HttpSource(server.url, timeout=1.0), tmp_path / "consumer", "1")
            assert time.monotonic() - started < 5
        finally:
            server.close()


def test_without_a_shared_registry_a_daemon_follows_nothing_it_did_not_publish(
    cluster: tuple[Path, str, Registry],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    _, url, _ = cluster
    follower = _follower(redis_client, tmp_path / "b", store_url=None)
    try:
        follower.start()  # the stream names a's v1 at a's real server: not followed
        announce(
            redis_client,
            STREAM,
            published(tmp_path / "a" / "bundles", 1),
            publisher="a",
            server=url,
        )
        time.sleep(1.5)
        assert latest_version(tmp_path / "b" / "bundles") is None and follower.pulled == []
    finally:
        follower.stop()
