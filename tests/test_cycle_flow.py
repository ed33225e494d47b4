"""Whole cycles through the CLI: a clean batch is promoted, a poisoned one rejected; a cycle
killed (-9) after training, during evaluation and inside promotion is completed by a re-run.
"""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path

import pytest
from conftest import cli_json, ingest, parity_rows, run_cli

from aftertune.store.examples import ExampleStore
from aftertune.store.registry import TRANSITIONS, Registry, VersionState

pytestmark = pytest.mark.slow


def _audit_is_consistent(state: Path) -> None:
    with Registry(state) as registry:
        promoted = registry.in_state(VersionState.PROMOTED)
        champion = registry.champion()
        assert champion is not None and [v.version for v in promoted] == [champion.version]
        for version in registry.versions():
            log = registry.audit_log(version.version)
            assert log[0].from_state is None and log[0].to_state == "candidate"
            for before, after in itertools.pairwise(log):
                assert after.from_state == before.to_state
                assert VersionState(after.to_state) in TRANSITIONS[VersionState(before.to_state)]
            assert log[-1].to_state == version.state.value


def test_crash_at_each_step_then_clean_promotion_then_poison_rejected(
    redis_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = {
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(state),
        "AFTERTUNE_TRAIN__MAX_STEPS": "60",
        "AFTERTUNE_TRAIN__PROGRESS": "false",
        # About crash safety, not the gate: 60 steps take parity to ~64 % against a 61 %
        # majority answer, which the chance rule rightly rejects (tests/test_gate.py).
        "AFTERTUNE_GATE__BEAT_CHANCE": "false",
    }
    ingest(env, tmp_path / "clean.jsonl", parity_rows(300, seed=1))

    for point in ("cycle.after_train", "cycle.during_eval", "registry.promote"):
        crashed = run_cli("cycle", "--json", env={**env, "AFTERTUNE_FAILPOINT": point}, timeout=900)
        assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr)
        with Registry(state) as registry:
            assert registry.champion() is None  # nothing half-promoted
            assert len(registry.versions()) == 1  # the trained candidate is kept and reused

    first = cli_json("cycle", "--json", env=env, timeout=900)
    assert first["decision"] == "promoted", first["reasons"]
    assert first["version"] == 1 and first["trained"] is None  # resumed, not retrained
    assert cli_json("status", "--json", env=env)["champion"]["version"] == 1
    _audit_is_consistent(state)

    # Labels flipped for a task the champion knows: the regression suite must catch it.
    ingest(env, tmp_path / "poison.jsonl", parity_rows(300, seed=2, flip=True))
    # With a JSON log and progress on, stderr is JSON lines only: progress comes as events.
    logged = {**env, "AFTERTUNE_TRAIN__PROGRESS": "true"}
    json_log = ("--log-format", "json", "--log-level", "info")
    done = run_cli("cycle", "--json", *json_log, env=logged, timeout=900)
    assert done.returncode == 3, done.stderr  # 3: rejected
    second = json.loads(done.stdout)
    events = [json.loads(line) for line in done.stderr.splitlines()]
    phases = {e["phase"] for e in events if "phase" in e}
    assert "train adapter" in phases, phases
    assert all(isinstance(e.get("done"), int | float) for e in events if "phase" in e)
    assert second["decision"] == "rejected" and second["exit_code"] == 3
    assert any(reason.startswith("parity:") for reason in second["reasons"]), second["reasons"]
    status = cli_json("status", "--json", env=env)
    assert status["champion"]["version"] == 1
    with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:
        watermark = registry.get(1).data_seq
        # The poisoned batch is set aside: no later cycle trains or judges on it.
        assert store.quarantined() == {2: store.max_seq() - watermark}
        assert store.count_train_after(watermark) == 0
    models = cli_json("models", "--json", env=env)
    assert [(m["version"], m["state"], m["champion"]) for m in models] == [
        (1, "promoted", True),
        (2, "rejected", False),
    ]
    _audit_is_consistent(state)
    refused = run_cli("approve", "2", env=env)
    assert refused.returncode == 1 and "v2 is rejected, not awaiting approval" in refused.stderr


def test_a_new_task_too_small_to_judge_waits_instead_of_being_quarantined(
    redis_url: str, tmp_path: Path
) -> None:
    """Two held-out records cannot show that a model beats chance: the data checks leave the
    task out (no training is spent), say more are needed, and the batch stays live."""
    state = tmp_path / "state"
    env = {
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(state),
        "AFTERTUNE_TRAIN__MAX_STEPS": "5",
        "AFTERTUNE_TRAIN__PROGRESS": "false",
    }
    rows = parity_rows(40, seed=3)
    held_out = [next(r for r in rows if r["output"] == answer) for answer in ("even", "odd")]
    for row in rows:
        row["split"] = "test" if row in held_out else "train"
    ingest(env, tmp_path / "small.jsonl", rows)
    done = cli_json("cycle", "--json", env=env, timeout=900, code=5)
    assert done["decision"] == "nothing_to_do"
    assert "its 2 new held-out records cannot show it beats chance" in done["reasons"][0], done
    assert "more held-out records are needed" in done["reasons"][0]
    with Registry(state) as registry:
        assert registry.versions() == []  # no training was spent on it
    with ExampleStore.in_state_dir(state) as store:
        assert store.quarantined() == {}
        assert store.count_train_after(0) == 38


def _fake_adapter(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": 2}))
    return path


def test_rollback_approve_reject_through_the_cli(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Fake adapters cannot be exported; publication has its own tests (test_publication.py).
    env = {"AFTERTUNE_STATE_DIR": str(state), "AFTERTUNE_EXPORT__ENABLED": "false"}
    with Registry(state) as registry:
        for n, parent in ((1, None), (2, 1), (3, 2), (4, 2)):
            v = registry.register_candidate(
                _fake_adapter(tmp_path, f"a{n}"), parent=parent, data_seq=n, training={}, lineage={}
            )
            registry.transition(v.version, VersionState.EVALUATING, actor="daemon", reason="gate")
            if n <= 2:
                registry.promote(v.version, actor="daemon", reason="passed")
            else:
                registry.transition(
                    v.version, VersionState.AWAITING_APPROVAL, actor="daemon", reason="passed"
                )
    assert run_cli("approve", "3", "--why", "looks good", env=env).returncode == 0
    done = run_cli("reject", "4", "--why", "too risky", env=env)
    assert done.returncode == 0, done.stderr
    assert run_cli("rollback", "2", env=env).returncode == 0
    with Registry(state) as registry:
        assert registry.champion().version == 2
        assert registry.get(3).state is VersionState.RETIRED
        assert registry.get(4).state is VersionState.REJECTED
        assert registry.audit_log(4)[-1].reason == "too risky"
        approval = [e for e in registry.audit_log(3) if e.to_state == "promoted"]
        assert approval[0].actor.startswith("cli") and approval[0].reason == "looks good"
    again = run_cli("reject", "4", "--why", "x", env=env)
    assert again.returncode == 1 and "not awaiting approval" in again.stderr
    missing = run_cli("rollback", "9", env=env)
    assert missing.returncode == 1 and "no model version 9" in missing.stderr
