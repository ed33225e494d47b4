"""Test session fixtures: a real Redis server and a real PostgreSQL on free ports, started
and stopped here."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from postgres_server import PostgresServer
from postgres_server import bindir as postgres_bindir

from aftertune.daemon.embedded_redis import RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent
# Real-task samples shipped in the repository (a plain clone has them; see their README).
DATASETS = REPO / "daemon" / "demo_data" / "real"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bindir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no pg_config); the SQLite tests still run")
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The session server's database, emptied for this test."""
    import psycopg

    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Run a test on both store backends: None (SQLite in the state dir), then PostgreSQL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real `aftertune` CLI in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "aftertune.daemon.cli", *args],
        env=full_env,
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, code: int = 0
) -> Any:
    """The command's JSON answer; it must exit ``code`` (`cycle`: 3 rejected, 4 awaiting...)."""
    done = run_cli(*args, env=env, timeout=timeout)
    if done.returncode != code:
        raise AssertionError(f"aftertune {' '.join(args)} failed: {done.stderr}")
    return json.loads(done.stdout)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def parity_rows(
    n: int, seed: int, *, flip: bool = False, high: int = 100_000
) -> list[dict[str, str]]:
    """``n`` records of a task the tiny model learns in a few dozen steps; ``flip`` poisons
    the labels. Inputs are drawn with replacement, so a few may repeat."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        number = rng.randrange(high)
        even = number % 2 == 0
        rows.append(
            {
                "task": "parity",
                "instruction": "Is the number even or odd?",
                "input": str(number),
                "output": "even" if even != flip else "odd",
            }
        )
    return rows


def last_digit_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` records of a second task, unlike parity, that the tiny model learns quickly."""
    rng = random.Random(f"last_digit:{seed}")
    rows = []
    for _ in range(n):
        number = str(rng.randrange(100_000))
        rows.append(
            {
                "task": "last_digit",
                "instruction": "What is the last digit of the number?",
                "input": number,
                "output": number[-1],
            }
        )
    return rows


def ingest(env: dict[str, str], path: Path, rows: list[dict[str, str]]) -> None:
    """Write ``rows`` to ``path``, push them and ingest them (`serve --burst`)."""
    write_jsonl(path, rows)
    assert run_cli("push", str(path), env=env).returncode == 0
    assert run_cli("serve", "--burst", env=env).returncode == 0
