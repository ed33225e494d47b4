"""Anyone who can XADD to ``aftertune:promotions`` used to decide what every daemon serves
(issue 25). Two real ``aftertune serve`` processes on one Redis and one PostgreSQL, with a
champion, receive forged promotion events; a hostile HTTP server holds re-sealed copies of
the champion's bundle with a changed prompt. What either daemon serves stays the champion,
the hostile server sees no request (so no token), the champion's bundle is kept however many
newer versions are announced, and both daemons stay up."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from hostile_server import HostileServer
from test_bundle_follow import _bundle, _resealed
from test_daemon import (  # the daemon-driving helpers; spawn is a fixture
    STOP_TIMEOUT_S,
    Daemon,
    daemon_env,
    spawn,  # noqa: F401
    wait_for,
    wait_ready,
)

from aftertune.daemon.embedded_redis import free_port
from aftertune.store.bundles import published_versions, set_latest
from aftertune.store.consumer.format import manifest_sha256
from aftertune.store.registry import Registry, VersionState

pytestmark = pytest.mark.slow

TOKEN = "the-cluster-token"
STREAM = "aftertune:promotions"


def _env(redis_url: str, postgres_url: str, state: Path, name: str) -> dict[str, str]:
    return daemon_env(
        redis_url,
        state,
        free_port(),
        AFTERTUNE_STORE__URL=postgres_url,
        AFTERTUNE_REDIS__CONSUMER=f"daemon-{name}",
        AFTERTUNE_SERVER__TOKEN=TOKEN,
        AFTERTUNE_CYCLE__ENABLED="false",  # the champion is made by hand: no training here
        AFTERTUNE_EXPORT__KEEP="2",
    )


def _champion_by_hand(state: Path, postgres_url: str) -> bytes:
    """v1 promoted and published by daemon-a, as its cycle would leave it; its manifest."""
    bundles = state / "bundles"
    final = _bundle(bundles, 1)
    set_latest(bundles, 1)
    adapter = state / "trained"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with Registry(state, postgres_url) as registry:
        registry.register_candidate(adapter, parent=None, data_seq=0, training={}, lineage={})
        registry.transition(1, VersionState.EVALUATING, actor="test", reason="by hand")
        registry.record_publication(1, manifest_sha256(final), "daemon-a")
        registry.promote(1, actor="test", reason="by hand")
    return (final / "manifest.json").read_bytes()


def _served_manifest(daemon: Daemon) -> bytes | None:
    request = urllib.request.Request(daemon.url + "/v1/models/latest/manifest")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return bytes(reply.read())
    except (urllib.error.URLError, OSError):
        return None


def test_forged_promotion_events_change_nothing_any_daemon_serves(
    redis_url: str,
    postgres_url: str,
    tmp_path: Path,
    spawn: Callable[..., Daemon],  # noqa: F811 - the fixture imported above
) -> None:
    real = _champion_by_hand(tmp_path / "a", postgres_url)
    hostile = HostileServer(tmp_path / "hostile")
    a_v1 = tmp_path / "a" / "bundles" / "v1"
    forged_v1 = _resealed(hostile.root, a_v1, 1)
    forged = {v: _resealed(hostile.root, a_v1, 1, as_version=v) for v in range(3, 8)}
    client = redis.Redis.from_url(redis_url)
    try:
        trainer = spawn(_env(redis_url, postgres_url, tmp_path / "a", "a"))
        wait_ready(trainer)
        env_b = _env(redis_url, postgres_url, tmp_path / "b", "b")
        other = spawn(env_b)
        wait_ready(other)  # caught up with v1, pulled from daemon-a's registered URL
        assert _served_manifest(other) == real

        def forge(version: int, sha: str, publisher: str) -> None:
            client.xadd(
                STREAM,
                {
                    "version": str(version),
                    "manifest_sha256": sha,
                    "publisher": publisher,
                    "server": hostile.url,
                },
            )

        forge(7, "0" * 64, "d9-forged")  # unknown version, all-zero sha
        forge(7, forged[7], "daemon-a")  # the trainer's name spoofed
        forge(7, forged[7], "daemon-b")  # the follower's own name spoofed
        forge(1, forged_v1, "daemon-a")  # the champion's number, a re-sealed copy
        for version in range(3, 8):  # five newer versions, more than export.keep = 2
            forge(version, forged[version], "daemon-a")
        for daemon in (trainer, other):
            wait_for(
                "8 forged events ignored",
                lambda d=daemon: len(d.messages("ignored a promotion event")) >= 8,
                60,
                trainer,
                other,
            )
            assert _served_manifest(daemon) == real
        for state in ("a", "b"):
            assert published_versions(tmp_path / state / "bundles") == [1]

        # b restarts with nothing: the newest events are forged, it still pulls the champion
        # from daemon-a and nothing from the server those events name.
        other.send(signal.SIGTERM)
        assert other.wait_exit(STOP_TIMEOUT_S) == 0
        shutil.rmtree(tmp_path / "b" / "bundles")
        again = spawn(env_b)
        wait_ready(again)
        assert _served_manifest(again) == real
        assert hostile.requests == [] and hostile.tokens_seen() == []
        assert trainer.proc.poll() is None and again.proc.poll() is None
        for daemon in (trainer, again):
            daemon.send(signal.SIGTERM)
        for daemon in (trainer, again):
            assert daemon.wait_exit(STOP_TIMEOUT_S) == 0
        assert json.loads(real)["version"] == 1
    finally:
        client.close()
        hostile.close()
