"""The deployed side end to end, as issue 26 checks it: a daemon with a champion; on the
consumer side `aftertune pull --follow` and `aftertune answer-server` on the followed
`current`, four clients asking all the time; new data is pushed, the daemon trains and
promotes a new version; the answers switch to it with no failed request, every answer names
its version, and a correction posted on an answer id lands as a record in the daemon's store.
All real: `aftertune serve`, Redis, the tiny model trained and exported, the CLI processes.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import last_digit_rows, run_cli, write_jsonl
from test_daemon import CYCLE_TIMEOUT_S, INSTRUCTION, Daemon, daemon_env, parity, wait_for

from aftertune.daemon.embedded_redis import free_port
from aftertune.store.bundles import latest_version
from aftertune.store.examples import ExampleStore
from aftertune.store.records import FEEDBACK_META, parse_record

pytestmark = pytest.mark.slow


def _push(env: dict[str, str], path: Path, rows: list[dict[str, str]]) -> None:
    write_jsonl(path, rows)
    done = run_cli("push", str(path), env=env)
    assert done.returncode == 0, done.stderr


def _post(conn: http.client.HTTPConnection, path: str, body: Any) -> tuple[int, Any]:
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


class Clients:
    """Four threads asking the answer server all the time, one keep-alive connection each."""

    def __init__(self, port: int, count: int = 4) -> None:
        self.port = port
        self.answers: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask, args=(i,)) for i in range(count)]

    def _ask(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n = i
        while not self._stop.is_set():
            n += 4
            try:
                code, got = _post(
                    conn,
                    "/v1/answer",
                    {"task": "parity", "instruction": INSTRUCTION, "input": str(n)},
                )
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append(f"client {i}: {exc!r}")
                conn.close()
                continue
            if code != 200:
                self.failures.append(f"client {i}: {code} {got}")
            else:
                self.answers.append(got)
        conn.close()

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def versions(self) -> set[int]:
        return {a["version"] for a in list(self.answers)}


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_promotion_reaches_four_clients_with_no_failure_and_a_correction_is_stored(
    redis_server: Any, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    state, consumer = tmp_path / "state", tmp_path / "consumer"
    env = daemon_env(
        redis_server.url,
        state,
        free_port(),
        AFTERTUNE_REDIS__STREAM=f"deployed-{tmp_path.name}",
        # About deployment, not the held-out rules (as tests/test_promote.py): 40-step
        # cycles judged on a few held-out records move accuracy by more than one std error.
        AFTERTUNE_GATE__NOISE_Z="10",
    )
    daemon = Daemon(env, tmp_path / "daemon.log", ())
    processes.append(daemon.proc)
    bundles = state / "bundles"
    _push(env, tmp_path / "first.jsonl", parity(160, seed=1))
    wait_for("v1 published", lambda: latest_version(bundles) == 1, CYCLE_TIMEOUT_S, daemon)

    cli = [sys.executable, "-m", "aftertune.daemon.cli"]
    follow = [*cli, "pull", "--follow", "--server", daemon.url, "--to", str(consumer)]
    processes.append(subprocess.Popen([*follow, "--wait", "2"], env=env))
    wait_for("v1 followed", lambda: (consumer / "current").exists(), 60, daemon)
    port = free_port()
    serve = [*cli, "answer-server", "--bundle", str(consumer / "current"), "--port", str(port)]
    serve += ["--redis-url", redis_server.url]  # feedback goes to the daemon's stream
    processes.append(subprocess.Popen(serve, env={**env, "AFTERTUNE_ANSWER_TOKEN": ""}))

    def ready() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False

    wait_for("the answer server ready", ready, 60, daemon)

    with Clients(port) as clients:
        wait_for("answers from v1", lambda: clients.versions() == {1}, 30, daemon)
        # A second task (as tests/test_promote.py): the base learns parity fully in the
        # first cycle, so more parity could not lower its held-out NLL and the gate would
        # rightly reject it.
        _push(env, tmp_path / "second.jsonl", last_digit_rows(160, seed=3))
        wait_for("answers from v2", lambda: 2 in clients.versions(), CYCLE_TIMEOUT_S, daemon)
        seen = len(clients.answers)
        wait_for("more answers from v2", lambda: len(clients.answers) > seen + 20, 30, daemon)
    assert clients.failures == [], clients.failures[:5]
    assert clients.versions() == {1, 2}
    assert all(a["answer_id"] and a["answer"] is not None for a in clients.answers)
    # Once one client got v2, v1 was at most finishing requests already in flight.
    first_v2 = next(i for i, a in enumerate(clients.answers) if a["version"] == 2)
    assert sum(a["version"] == 1 for a in clients.answers[first_v2:]) <= 4

    served = clients.answers[-1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    code, pushed = _post(
        conn, "/v1/feedback", {"answer_id": served["answer_id"], "correction": "odd"}
    )
    assert code == 202, pushed
    record = parse_record(json.dumps(pushed["record"]).encode())

    def stored() -> Any:
        with ExampleStore.in_state_dir(state) as store:
            return next(iter(store.get([record.id])), None)

    example = wait_for("the correction stored by the daemon", stored, 60, daemon)
    assert (example.instruction, example.output) == (INSTRUCTION, "odd")
    assert example.meta[FEEDBACK_META]["served_version"] == 2
    assert example.meta[FEEDBACK_META]["answer_id"] == served["answer_id"]
    assert os.readlink(consumer / "current") == "v2"
