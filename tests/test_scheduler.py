"""The scheduler's decisions against a real store, registry and Redis; no cycle runs here."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from aftertune.daemon.metrics import DaemonMetrics
from aftertune.daemon.scheduler import CycleScheduler
from aftertune.daemon.settings import Settings
from aftertune.store.examples import ExampleStore
from aftertune.store.records import record_from_obj
from aftertune.store.registry import Registry, VersionState


def _store(state: Path, n: int, split: str, start: int = 0) -> None:
    rows = [
        {"task": "echo", "instruction": "Echo.", "input": str(i), "output": str(i), "split": split}
        for i in range(start, start + n)
    ]
    with ExampleStore.in_state_dir(state) as store:
        store.add([record_from_obj(row) for row in rows])


def _champion(state: Path, data_seq: int) -> None:
    adapter = state.parent / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    with Registry(state) as reg:
        v = reg.register_candidate(adapter, parent=None, data_seq=data_seq, training={}, lineage={})
        reg.transition(v.version, VersionState.EVALUATING, actor="test", reason="gate")
        reg.promote(v.version, actor="test", reason="a champion")


def test_waiting_examples_are_counted_and_exported_as_a_metric(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    state = tmp_path / "state"
    settings = Settings(state_dir=state)
    metrics = DaemonMetrics()
    scheduler = CycleScheduler(lambda: settings, redis_client, metrics)

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("aftertune_examples_waiting")

    _store(state, 7, "train")
    _store(state, 3, "test", start=100)  # held-out data does not wait for training
    assert scheduler.waiting()[:2] == (7, 7)
    assert gauge() == 7.0

    _champion(state, data_seq=4)  # trained on seq 1..4; 5, 6, 7 are newer
    assert scheduler.waiting()[0] == 3
    assert gauge() == 3.0
