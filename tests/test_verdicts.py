"""Verdicts per task, through real cycles on the tiny model: one bad batch never costs the
other tasks their feedback, a task too small to judge waits, the data checks reject a
relabelled batch without a training run, and an operator can overrule the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import last_digit_rows, parity_rows

from aftertune.daemon.learning import approve, workspace
from aftertune.daemon.settings import Settings, load_settings
from aftertune.learners.errors import DataRejected
from aftertune.learners.gate import Decision, Verdict
from aftertune.store.examples import DATA_CHECKS, ExampleStore
from aftertune.store.records import record_from_obj
from aftertune.store.registry import Registry, VersionState

pytestmark = pytest.mark.slow


def _settings(state: Path, steps: int = 60, **gate: Any) -> Settings:
    return load_settings(
        overrides={
            "state_dir": str(state),
            "train": {"max_steps": steps, "progress": False, "checkpoint_every": 0},
            "export": {"enabled": False},
            # About the verdicts, not the chance rule (tests/test_gate.py has it).
            "gate": {"beat_chance": False, **gate},
        }
    )


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per input (the generators draw inputs with replacement)."""
    return list({r["input"]: r for r in rows}.values())


def _add(state: Path, rows: list[dict[str, Any]], test_every: int = 5) -> None:
    """Every ``test_every``-th record held out, the rest to train on."""
    records = [
        record_from_obj({**r, "split": "test" if (i + 1) % test_every == 0 else "train"})
        for i, r in enumerate(rows)
    ]
    with ExampleStore.in_state_dir(state) as store:
        store.add(records)


def _cycle(settings: Settings) -> Any:
    with workspace(settings, "test") as ws:
        return ws.cycle()


def test_a_flipped_batch_is_quarantined_alone_a_clean_task_promoted_a_small_one_waits(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    settings = _settings(state)
    _add(state, _unique(parity_rows(300, seed=1)))
    first = _cycle(settings)
    assert first.decision is Decision.PROMOTED, first.reasons
    parity_before = first.metrics["parity"]["challenger"]["nll"]

    flipped = _unique(parity_rows(200, seed=2, flip=True))  # new inputs, every label wrong
    clean = _unique(last_digit_rows(200, seed=3))
    small = [{**r, "task": "tiny_task"} for r in last_digit_rows(3, seed=4)]
    _add(state, flipped + clean)
    _add(state, small, test_every=100)  # three train records, no held-out one: it waits
    second = _cycle(settings)

    assert second.decision is Decision.PROMOTED, second.reasons
    (attempt,) = second.attempts  # the first attempt, with the flipped batch, was rejected
    assert attempt["decision"] == "rejected"
    assert any(r.startswith("parity: ") for r in attempt["reasons"]), attempt
    assert not any(r.startswith("last_digit: ") for r in attempt["reasons"]), attempt
    assert any("training again without parity" in r for r in attempt["reasons"]), attempt
    assert second.report.verdicts["last_digit"] is Verdict.ADMITTED
    assert second.report.verdicts["tiny_task"] is Verdict.WAITING
    with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:
        held = store.quarantined_counts()
        assert held == {"parity": len(flipped)}  # the flipped batch, and nothing of the others
        champion = registry.champion()
        assert champion is not None and champion.version == second.version == 3
        assert registry.get(2).state is VersionState.REJECTED
        learned = champion.lineage["trained_on"]["count_by_task"]
        assert set(learned) == {"last_digit"}
        assert champion.lineage["held_back"] == {"tiny_task": registry.get(1).data_seq}
        assert store.counts()["tiny_task"]["train"] == 3  # live, waiting for held-out data
    parity_after = second.metrics["parity"]["challenger"]["nll"]
    assert parity_after <= parity_before + 0.05  # the known task keeps its score


def test_a_relabelled_batch_is_rejected_before_any_training_and_can_be_released(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    settings = _settings(state, steps=20)
    rows = _unique(parity_rows(120, seed=5))[:100]
    _add(state, rows)
    assert _cycle(settings).version == 1
    relabelled = [{**r, "output": "odd" if r["output"] == "even" else "even"} for r in rows]
    relabelled = [{**r, "source": "relabel"} for r in relabelled]
    _add(state, relabelled)
    with pytest.raises(DataRejected) as caught:
        _cycle(settings)
    (reason,) = caught.value.reasons
    assert reason.startswith("parity: 100 of 100 new records (100.0%) give another answer")
    with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:
        assert [v.version for v in registry.versions()] == [1]  # no training was spent
        (batch,) = store.quarantine_summary()
        assert (batch.version, batch.task, batch.count) == (DATA_CHECKS, "parity", 100)
        assert store.release(version=DATA_CHECKS) == 100
        assert store.count_train_after(registry.get(1).data_seq) == 80  # new data again


def test_an_operator_overrules_a_rejection_and_the_audit_log_says_who_and_why(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    settings = _settings(state, steps=20)
    strict = _settings(state, steps=20, min_gain=1.0)  # no model gains 100 points
    _add(state, _unique(parity_rows(150, seed=6)))
    assert _cycle(settings).decision is Decision.PROMOTED
    second = _unique(parity_rows(150, seed=7))
    _add(state, second)
    rejected = _cycle(strict)  # a false rejection
    assert rejected.decision is Decision.REJECTED
    with ExampleStore.in_state_dir(state) as store:
        assert store.quarantined_counts() == {"parity": len(second)}
    approve(
        settings, rejected.version, "ops:alice", "the gain rule was misconfigured", override=True
    )
    with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:
        champion = registry.champion()
        assert champion is not None and champion.version == rejected.version
        entry = registry.audit_log(rejected.version)[-1]
        assert (entry.from_state, entry.to_state, entry.actor) == (
            "rejected",
            "promoted",
            "ops:alice",
        )
        assert entry.reason == "override: the gain rule was misconfigured"
        assert store.quarantined_counts() == {}  # released: the promoted version learned them
