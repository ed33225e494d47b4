"""`aftertune pull --follow` keeps DIR/current at the latest promoted version: woken by the
promotions stream or by a long poll of the daemon's /v1/models/latest, through daemon
outages, and stopped cleanly by SIGTERM. Real server, real Redis, real bundles."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from consumer_fixtures import daemon_server, eventually, export_published_state, republish
from redis.backoff import ExponentialBackoff

from aftertune.daemon.embedded_redis import free_port
from aftertune.store.consumer.follow import Follower, FollowSpec
from aftertune.store.consumer.pull import HttpSource


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_published_state(tmp_path_factory.mktemp("follow") / "state")


@pytest.fixture
def state(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "state", symlinks=True))


def current_version(to_dir: Path) -> int | None:
    link = to_dir / "current"
    return int(os.readlink(link).removeprefix("v")) if link.is_symlink() else None


@pytest.fixture
def following(state: Path, tmp_path: Path) -> Iterator[Path]:
    """A follower (long polls of 2 s, a hook writing the version) on a running server."""
    with daemon_server(state) as url:
        spec = FollowSpec(
            to_dir=tmp_path / "consumer",
            wait_s=2,
            exec_cmd=f'echo "$AFTERTUNE_VERSION" >> {tmp_path / "hook.log"}',
        )
        follower = Follower(HttpSource(url), spec)
        thread = threading.Thread(target=follower.run, daemon=True)
        thread.start()
        yield spec.to_dir
        follower.request_stop()
        thread.join(5)
        assert not thread.is_alive(), "the follower did not stop within 5 s of the request"


def test_a_promotion_is_followed_by_long_poll_and_the_hook_runs_after_the_switch(
    following: Path, state: Path, tmp_path: Path
) -> None:
    to_dir = following
    eventually(lambda: current_version(to_dir) == 1, what="the first pull")
    assert not (tmp_path / "hook.log").exists() or (tmp_path / "hook.log").read_text() == "1\n"
    republish(state / "bundles", 2)
    eventually(lambda: current_version(to_dir) == 2, what="v2 followed")
    eventually(lambda: (tmp_path / "hook.log").read_text().split()[-1] == "2", what="hook ran")
    assert (to_dir / "current" / "manifest.json").is_file()


def test_the_long_poll_answers_304_when_nothing_moved_and_at_once_when_latest_moves(
    state: Path,
) -> None:
    with daemon_server(state) as url:
        with urllib.request.urlopen(f"{url}/v1/models/latest") as response:
            etag = response.headers["ETag"]
        request = urllib.request.Request(f"{url}/v1/models/latest?wait=1")
        request.add_header("If-None-Match", etag)
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as unchanged:
            urllib.request.urlopen(request)
        assert unchanged.value.code == 304
        assert 0.9 <= time.monotonic() - started < 3
        threading.Timer(0.5, republish, (state / "bundles", 2)).start()
        request = urllib.request.Request(f"{url}/v1/models/latest?wait=20")
        request.add_header("If-None-Match", etag)
        started = time.monotonic()
        with urllib.request.urlopen(request) as response:
            assert response.headers["ETag"] != etag
            assert b'"version":2' in response.read()
        assert time.monotonic() - started < 5
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(f"{url}/v1/models/latest?wait=9999")
        assert bad.value.code == 400


def test_a_promotion_event_wakes_the_follower_before_its_long_wait_ends(
    state: Path, tmp_path: Path, redis_url: str
) -> None:
    with daemon_server(state) as url:
        spec = FollowSpec(to_dir=tmp_path / "consumer", redis_url=redis_url, wait_s=60)
        follower = Follower(HttpSource(url), spec)
        thread = threading.Thread(target=follower.run, daemon=True)
        thread.start()
        try:
            eventually(lambda: current_version(spec.to_dir) == 1, what="the first pull")
            time.sleep(1.5)  # the follower blocks on the stream now
            republish(state / "bundles", 2)
            client = redis.Redis.from_url(redis_url)
            client.xadd(spec.stream, {"version": "2", "manifest_sha256": "hint only"})
            client.close()
            eventually(lambda: current_version(spec.to_dir) == 2, 10, "woken by the event")
        finally:
            follower.request_stop()
            thread.join(5)
        assert not thread.is_alive()


def test_an_unreachable_daemon_is_waited_out_with_backoff_and_one_log_line(
    state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = FollowSpec(to_dir=tmp_path / "consumer", wait_s=2)
    follower = Follower(HttpSource(url), spec, backoff=ExponentialBackoff(cap=0.4, base=0.1))
    attempts = 0
    original = follower._down

    def counted(exc: Exception) -> None:
        nonlocal attempts
        attempts += 1
        original(exc)

    follower._down = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=follower.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="aftertune.store.consumer.follow"):
        thread.start()
        time.sleep(2.0)
        # Backoff, not a busy loop: 0.1, 0.2, 0.4, 0.4... about six tries in two seconds.
        assert 2 <= attempts <= 10
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert f"cannot follow {url}" in errors[0].getMessage()
        assert "is the daemon running" in errors[0].getMessage()
        with daemon_server(state, port=port):
            eventually(lambda: current_version(spec.to_dir) == 1, what="pulled once it is up")
            follower.request_stop()
            thread.join(5)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert not thread.is_alive()


def test_the_cli_follows_and_stops_cleanly_on_sigterm(state: Path, tmp_path: Path) -> None:
    to_dir = tmp_path / "consumer"
    with daemon_server(state) as url:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "aftertune.daemon.cli", "pull", "--follow"),
                *("--server", url, "--to", str(to_dir), "--wait", "5"),
            ],
            env={**os.environ, "AFTERTUNE_STATE_DIR": str(tmp_path / "s"), "AFTERTUNE_TOKEN": ""},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            eventually(lambda: current_version(to_dir) == 1, 30, "the CLI's first pull")
            republish(state / "bundles", 2)
            eventually(lambda: current_version(to_dir) == 2, 15, "the CLI followed v2")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 3
    assert (
        "switched" in err and "follow stopped after 2 switch(es)" in err
    )  # the first install, then v2


def test_follow_without_a_server_says_what_to_give() -> None:
    from conftest import run_cli

    done = run_cli("pull", "--follow", "--from", "/nonexistent")
    assert done.returncode != 0
    assert "--follow needs --server URL" in done.stderr
