"""Shadow evaluation in the gate (issue 26 item 4): a challenger that passed the held-out
checks waits for live traffic; the daemon tallies the answer servers' reports from a real
Redis and the gate promotes, rejects, keeps waiting or leaves it to a person. A forged report
(another version, another bundle, malformed, older than the wait) is not counted. Real parts:
the tiny base exported for real as the challenger's bundle, the real registry and store, the
daemon's own judging function; the training run is left out (the cycle's hook is in
``test_a_cycle_with_shadow_on_waits_for_live_traffic`` below, slow).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import cli_json, ingest, parity_rows, run_cli
from consumer_fixtures import export_published_state
from prometheus_client import generate_latest

from aftertune.daemon.learning import workspace
from aftertune.daemon.metrics import DaemonMetrics
from aftertune.daemon.report import render_report
from aftertune.daemon.settings import Settings, load_settings
from aftertune.daemon.shadow_judge import candidate_version, judge_shadow
from aftertune.learners.gate import Decision, GateReport
from aftertune.learners.shadow_gate import begin_shadow
from aftertune.learners.shadow_rules import ShadowOptions, ShadowStatus, shadow_verdict
from aftertune.store.bundles import latest_version
from aftertune.store.consumer.format import manifest_sha256
from aftertune.store.examples import ExampleStore
from aftertune.store.records import parse_record
from aftertune.store.registry import Registry, VersionState
from aftertune.store.shadow import ShadowReport, ShadowTally, tally

STREAM = "aftertune:shadow"


def _report(sha: str, server: str = "answers-a", version: int = 1, **counts: int) -> dict[str, str]:
    fields = {"compared": 0, "agreed": 0, "feedback": 0, "feedback_agreed": 0, **counts}
    return ShadowReport(server, version, sha, 0, sent_at=time.time(), **fields).fields()


# --- the rule, on its own


@pytest.mark.parametrize(
    ("counts", "waited", "status", "judged_on"),
    [
        ({"compared": 9, "agreed": 9}, 0, ShadowStatus.WAITING, None),  # too few yet
        ({"compared": 9, "agreed": 9}, 3600, ShadowStatus.TIMED_OUT, None),
        ({"compared": 10, "agreed": 8}, 0, ShadowStatus.PASSED, "champion"),
        ({"compared": 10, "agreed": 7}, 0, ShadowStatus.FAILED, "champion"),
        # Feedback outranks the champion once there is enough of it...
        (
            {"compared": 10, "agreed": 2, "feedback": 3, "feedback_agreed": 3},
            0,
            "passed",
            "feedback",
        ),
        (
            {"compared": 10, "agreed": 10, "feedback": 3, "feedback_agreed": 1},
            0,
            "failed",
            "feedback",
        ),
        # ...and not before.
        (
            {"compared": 10, "agreed": 10, "feedback": 2, "feedback_agreed": 0},
            0,
            "passed",
            "champion",
        ),
    ],
)
def test_the_verdict_judges_feedback_above_the_champion(
    counts: dict[str, int], waited: float, status: str, judged_on: str | None
) -> None:
    rules = ShadowOptions(
        shadow_requests=10, min_shadow_agreement=0.8, shadow_min_feedback=3, shadow_timeout_s=60
    )
    verdict = shadow_verdict(ShadowTally(**counts), rules, waited)
    assert verdict.status is ShadowStatus(status)
    assert verdict.judged_on == judged_on
    assert "gate.shadow" in verdict.reason or "gate.min_shadow_agreement" in verdict.reason


def test_the_tally_counts_each_servers_newest_report_on_the_judged_bundle_only() -> None:
    sha, other = "a" * 64, "b" * 64
    entries = [
        _report(sha, "a", compared=5, agreed=4),
        _report(sha, "a", compared=9, agreed=7),  # a newer total: replaces the first
        _report(sha, "b", compared=3, agreed=3, feedback=2, feedback_agreed=1),
        _report(sha, "c", version=2, compared=1000, agreed=1000),  # not the judged version
        _report(other, "d", compared=1000, agreed=1000),  # not its bundle
        {**_report(sha, "e"), "agreed": "5"},  # more agreed than compared
        {b"version": b"1"},  # not a report
    ]
    assert tally(entries, 1, sha) == ShadowTally(
        compared=12, agreed=10, feedback=2, feedback_agreed=1, servers=2, ignored=4
    )


# --- the daemon's judgment on a challenger in shadow evaluation


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_published_state(tmp_path_factory.mktemp("shadow-gate") / "state")


@dataclass
class Waiting:
    settings: Settings
    sha: str  # the challenger bundle's manifest sha256


def _settings(state: Path, redis_url: str, **gate: object) -> Settings:
    rules = {"shadow_requests": 10, "min_shadow_agreement": 0.8, "shadow_min_feedback": 3}
    return load_settings(
        overrides={
            "state_dir": str(state),
            "redis": {"url": redis_url},
            "gate": {**rules, **gate},
        }
    )


@pytest.fixture
def waiting(
    exported: Path, tmp_path: Path, redis_url: str, request: pytest.FixtureRequest
) -> Iterator[Waiting]:
    """v1 passed the held-out checks and waits for live traffic, its bundle exported (the
    tiny base), not latest; eight train records of its batch are in the store."""
    state = tmp_path / "state"
    (state / "bundles").mkdir(parents=True)
    shutil.copytree(exported / "bundles" / "v1", state / "bundles" / "v1")
    settings = _settings(state, redis_url, **getattr(request, "param", {}))
    with ExampleStore.in_state_dir(state) as store:
        store.add(
            [
                parse_record(json.dumps({"task": "t", "instruction": f"q{i}", "output": "a"}))
                for i in range(8)
            ]
        )
        seq = store.max_seq()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    sha = manifest_sha256(state / "bundles" / "v1")
    with Registry(state) as registry:
        registry.register_candidate(
            adapter,
            parent=None,
            data_seq=seq,
            training={},
            lineage={"trained_on": {"seq_range": [0, seq], "count_by_task": {"t": 8}}},
        )
        registry.transition(1, VersionState.EVALUATING, actor="test", reason="gate")
        registry.record_publication(1, sha, "daemon")
    with workspace(settings, actor="test") as ws:
        challenger = ws.state.registry.get(1)
        passed = GateReport(Decision.PROMOTED, [])
        decision, reasons, _ = begin_shadow(ws.state, challenger, passed)
    assert decision is Decision.AWAITING_APPROVAL
    assert "in shadow evaluation on live traffic" in reasons[-1]
    yield Waiting(settings, sha)


def _judged(settings: Settings, client: redis.Redis) -> str:
    judgment = judge_shadow(settings, client)
    assert judgment is not None and judgment.version == 1
    return judgment.status


def _state(settings: Settings) -> tuple[VersionState, dict[str, object]]:
    with Registry(settings.state_dir) as registry:
        found = registry.get(1)
    return found.state, found.gate["shadow"]


def test_the_gate_waits_ignores_forged_reports_then_promotes(
    waiting: Waiting, redis_client: redis.Redis
) -> None:
    settings, sha = waiting.settings, waiting.sha
    assert candidate_version(settings) == 1  # what GET /v1/models/candidate announces
    assert latest_version(settings.state_dir / "bundles") is None  # not published
    # Forged: sent before v1 began waiting (an explicit old id), another version, another
    # bundle of v1, and counts that cannot be.
    redis_client.xadd(STREAM, _report(sha, "old", compared=1000, agreed=1000), id="1-0")
    redis_client.xadd(STREAM, _report(sha, "x", version=2, compared=1000, agreed=1000))
    redis_client.xadd(STREAM, _report("f" * 64, "y", compared=1000, agreed=1000))
    redis_client.xadd(STREAM, {**_report(sha, "z"), "compared": "-5"})
    redis_client.xadd(STREAM, _report(sha, "answers-a", compared=6, agreed=6))
    assert _judged(settings, redis_client) == "waiting"
    state, shadow = _state(settings)
    assert state is VersionState.AWAITING_APPROVAL
    assert shadow["tally"] == {
        "compared": 6,
        "agreed": 6,
        "feedback": 0,
        "feedback_agreed": 0,
        "servers": 1,
        "ignored": 3,
    }
    assert "10 are needed (gate.shadow_requests)" in str(shadow["reason"])
    # The daemon's /metrics and the HTML report show the same figures while it waits.
    metrics = DaemonMetrics()
    metrics.record_shadow(judge_shadow(settings, redis_client))
    scraped = generate_latest(metrics.registry).decode()
    assert "aftertune_shadow_version 1.0" in scraped
    assert 'aftertune_shadow_status{aftertune_shadow_status="waiting"} 1.0' in scraped
    assert "aftertune_shadow_compared 6.0" in scraped
    assert 'aftertune_shadow_agreement_ratio{against="champion"} 1.0' in scraped
    assert 'aftertune_shadow_agreement_ratio{against="feedback"} NaN' in scraped
    with Registry(settings.state_dir) as registry:
        page = render_report(registry, 1)
    assert "Live traffic (shadow evaluation)" in page
    assert '<td class="num">6</td><td class="num">6</td><td class="num">100.0</td>' in page
    assert "3 reports on other bundles or malformed, not counted" in page

    # Two answer servers together pass: 9 of 12 agree with the champion (75 %), but 3 of 3
    # feedback agrees with the challenger, and feedback is judged first.
    redis_client.xadd(STREAM, _report(sha, "answers-a", compared=8, agreed=6))
    redis_client.xadd(
        STREAM, _report(sha, "answers-b", compared=4, agreed=3, feedback=3, feedback_agreed=3)
    )
    assert _judged(settings, redis_client) == "passed"
    with Registry(settings.state_dir) as registry:
        champion = registry.champion()
        promoted = registry.get(1)
    assert champion is not None and champion.version == 1
    assert promoted.gate["shadow"]["judged_on"] == "feedback"
    assert any("judged on agreement with the feedback" in r for r in promoted.gate["reasons"])
    assert latest_version(settings.state_dir / "bundles") == 1
    assert manifest_sha256(settings.state_dir / "bundles" / "v1") == sha  # the shadowed one
    assert candidate_version(settings) is None
    metrics.record_shadow(None)  # the scheduler's check finds none in shadow evaluation now
    assert "aftertune_shadow_version 0.0" in generate_latest(metrics.registry).decode()

    shown = run_cli("models", "show", "1", env={"AFTERTUNE_STATE_DIR": str(settings.state_dir)})
    assert shown.returncode == 0, shown.stderr
    assert "live traffic (shadow): passed" in shown.stdout
    assert "with the champion: 9 of 12 shadowed answers agree (75.0%)" in shown.stdout


def test_too_little_agreement_rejects_and_quarantines_its_batch(
    waiting: Waiting, redis_client: redis.Redis
) -> None:
    settings, sha = waiting.settings, waiting.sha
    redis_client.xadd(STREAM, _report(sha, compared=10, agreed=5))
    assert _judged(settings, redis_client) == "failed"
    state, shadow = _state(settings)
    assert state is VersionState.REJECTED
    assert "is under the 80.0% needed (gate.min_shadow_agreement)" in str(shadow["reason"])
    with ExampleStore.in_state_dir(settings.state_dir) as store:
        assert store.quarantined() == {1: 8}
    with Registry(settings.state_dir) as registry:
        assert registry.champion() is None
    assert candidate_version(settings) is None


@pytest.mark.parametrize("waiting", [{"shadow_timeout_s": 0.5}], indirect=True)
def test_no_traffic_within_the_timeout_leaves_it_to_a_person(
    waiting: Waiting, redis_client: redis.Redis
) -> None:
    settings, sha = waiting.settings, waiting.sha
    redis_client.xadd(STREAM, _report(sha, compared=3, agreed=3))
    time.sleep(0.6)
    assert _judged(settings, redis_client) == "timed_out"
    redis_client.xadd(STREAM, _report(sha, compared=50, agreed=50))  # too late: a person decides
    assert _judged(settings, redis_client) == "timed_out"
    state, shadow = _state(settings)
    assert state is VersionState.AWAITING_APPROVAL
    assert shadow["status"] == "timed_out" and shadow["tally"]["compared"] == 50  # type: ignore[index]
    env = {"AFTERTUNE_STATE_DIR": str(settings.state_dir)}
    approved = cli_json("approve", "1", "--why", "checked by hand", "--json", env=env)
    assert approved["state"] == "promoted"


@pytest.mark.slow
def test_a_cycle_with_shadow_on_waits_for_live_traffic(redis_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(state),
        "AFTERTUNE_TRAIN__MAX_STEPS": "60",
        "AFTERTUNE_TRAIN__PROGRESS": "false",
        # About publication, not the held-out rules (as tests/test_promote.py).
        "AFTERTUNE_GATE__NOISE_Z": "10",
        "AFTERTUNE_GATE__BEAT_CHANCE": "false",
        "AFTERTUNE_GATE__SHADOW_REQUESTS": "100",
        "OMP_NUM_THREADS": "1",
    }
    ingest(env, tmp_path / "first.jsonl", parity_rows(300, seed=1))
    done = run_cli("cycle", "--json", env=env, timeout=900)
    assert done.returncode == 4, done.stderr  # awaits a decision
    result = json.loads(done.stdout)
    assert result["decision"] == "awaiting_approval"
    assert any("in shadow evaluation on live traffic" in r for r in result["reasons"])
    with Registry(state) as registry:
        version = registry.get(result["version"])
        assert registry.publication(version.version) is not None
    assert version.gate["shadow"]["status"] == "waiting"
    assert (state / "bundles" / f"v{version.version}" / "manifest.json").is_file()
    assert latest_version(state / "bundles") is None  # exported, not published
    blocked = run_cli("cycle", env=env)
    assert blocked.returncode == 4 and "is in shadow evaluation on live traffic" in blocked.stdout
