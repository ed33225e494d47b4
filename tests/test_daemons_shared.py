"""Two daemons on one Redis and one PostgreSQL, each with its own state dir and port: the
trainer is killed with SIGKILL mid-cycle, the other completes the cycle, and both end up
serving the same verified bundle (issue 16)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from test_daemon import (  # the daemon-driving helpers; spawn is a fixture
    CYCLE_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Daemon,
    daemon_env,
    http_get,
    parity,
    push,
    spawn,  # noqa: F401
    wait_for,
    wait_ready,
)

from aftertune.daemon.embedded_redis import free_port
from aftertune.store.bundles import latest_version
from aftertune.store.registry import Registry

pytestmark = pytest.mark.slow


def _env(redis_url: str, postgres_url: str, state: Path, name: str) -> dict[str, str]:
    return daemon_env(
        redis_url,
        state,
        free_port(),
        AFTERTUNE_STORE__URL=postgres_url,
        AFTERTUNE_REDIS__CONSUMER=f"daemon-{name}",
        AFTERTUNE_CYCLE__LOCK_TTL_S="3",  # a killed trainer's lock expires quickly
        AFTERTUNE_TRAIN__MAX_STEPS="10",  # the test is about who finishes the cycle
        AFTERTUNE_INGEST__CLAIM_IDLE_MS="2000",
        AFTERTUNE_INGEST__CLAIM_INTERVAL_S="1",
    )


def _latest_manifest(daemon: Daemon) -> str | None:
    code, body = http_get(daemon.url + "/v1/models/latest/manifest")
    return body if code == 200 else None


def test_the_other_daemon_completes_a_killed_trainer_s_cycle_and_both_serve_its_bundle(
    redis_url: str,
    postgres_url: str,
    tmp_path: Path,
    spawn: Callable[..., Daemon],  # noqa: F811 - the fixture imported above
) -> None:
    env_a = _env(redis_url, postgres_url, tmp_path / "a", "a")
    env_b = _env(redis_url, postgres_url, tmp_path / "b", "b")
    # a trains first (b is not up yet) and dies, SIGKILLed, while its challenger is evaluated.
    doomed = spawn({**env_a, "AFTERTUNE_FAILPOINT": "cycle.during_eval"})
    wait_ready(doomed)
    first = parity(150, seed=11)
    push(env_a, tmp_path / "first.jsonl", first)
    doomed.wait_log("cycle starting")
    other = spawn(env_b)
    wait_ready(other)
    # While a trains, more records (some already sent): both daemons ingest from the group.
    second = parity(40, seed=12) + first[:20]
    push(env_b, tmp_path / "second.jsonl", second)
    assert doomed.wait_exit(CYCLE_TIMEOUT_S) == -signal.SIGKILL

    # b takes the lock once a's expires and finishes the cycle: v1, evaluated again.
    other.wait_log("v1 promoted")
    wait_for("v1 published by b", lambda: latest_version(tmp_path / "b" / "bundles") == 1, 60)
    with Registry(tmp_path / "b", postgres_url) as registry:
        assert [(v.version, v.state.value) for v in registry.versions()] == [(1, "promoted")]
        promoted = [e for e in registry.audit_log(1) if e.to_state == "promoted"]
        assert len(promoted) == 1

    # a comes back late and catches up: it pulls v1 from b rather than rebuilding it.
    restarted = spawn(env_a)
    wait_ready(restarted)
    restarted.wait_log("v1 pulled from daemon-b")
    served = [_latest_manifest(d) for d in (other, restarted)]
    assert served[0] is not None and served[0] == served[1]
    assert restarted.messages("cycle starting") == []

    # Every record stored exactly once, whichever daemon read it, and nothing left pending.
    distinct = {(r["input"], r["output"]) for r in first + second}
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT input, output, COUNT(*) FROM examples GROUP BY 1, 2")
        counts = {(i, o): n for i, o, n in rows.fetchall()}
    assert set(counts) == distinct and set(counts.values()) == {1}

    for daemon in (other, restarted):
        daemon.send(signal.SIGTERM)
    for daemon in (other, restarted):
        assert daemon.wait_exit(STOP_TIMEOUT_S + 10) == 0
