"""Replay plugin: batch mix ratio, task balance, determinism, cap; no state kept."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from learner_fixtures import Ex
from spec_fixtures import replay_spec

from aftertune.learners.replay import (
    _balanced_quota,
    cap_pool,
    mix_batches,
    sample_past,
    split_batch,
)
from aftertune.store.examples import ExampleStore
from aftertune.store.records import Record, record_from_obj


def pool_of(sizes: dict[str, int]) -> list[Ex]:
    return [Ex(task, "i", f"{task}{k}", "o") for task, n in sizes.items() for k in range(n)]


NEW = [Ex("new", "i", str(k), "o") for k in range(40)]


def test_each_batch_mixes_new_and_replay_at_the_ratio() -> None:
    pool = pool_of({"a": 30, "b": 30})
    batches = mix_batches(NEW, pool, replay_spec(ratio=1.0), batch_size=8, seed=0, epoch=0)
    assert [len(b.new) for b in batches] == [4] * 10
    assert [len(b.replay) for b in batches] == [4] * 10
    # Every new example exactly once per epoch.
    assert sorted(i for b in batches for i in b.new) == list(range(len(NEW)))

    third = mix_batches(NEW, pool, replay_spec(ratio=1 / 3), batch_size=8, seed=0, epoch=0)
    new_total = sum(len(b.new) for b in third)
    replay_total = sum(len(b.replay) for b in third)
    assert new_total == 40 and abs(replay_total / new_total - 1 / 3) < 0.05
    assert all(len(b) <= 8 for b in third)


def test_replay_draw_is_task_balanced_even_when_pool_is_skewed() -> None:
    pool = pool_of({"big": 200, "small": 10, "mid": 50})
    batches = mix_batches(NEW, pool, replay_spec(ratio=1.0), batch_size=8, seed=3, epoch=0)
    counts = Counter(pool[j].task for b in batches for j in b.replay)
    assert set(counts) == {"big", "small", "mid"}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_deterministic_for_a_seed_and_epoch_and_varies_otherwise() -> None:
    pool = pool_of({"a": 20, "b": 20})
    spec = replay_spec(ratio=1.0)
    one = mix_batches(NEW, pool, spec, batch_size=8, seed=5, epoch=1)
    assert one == mix_batches(NEW, pool, spec, batch_size=8, seed=5, epoch=1)
    assert one != mix_batches(NEW, pool, spec, batch_size=8, seed=5, epoch=2)
    assert one != mix_batches(NEW, pool, spec, batch_size=8, seed=6, epoch=1)


def test_disabled_or_empty_pool_gives_new_only_batches() -> None:
    pool = pool_of({"a": 20})
    for spec, p in (
        (replay_spec(enabled=False), pool),
        (replay_spec(ratio=0.0), pool),
        (replay_spec(), []),
    ):
        batches = mix_batches(NEW, p, spec, batch_size=8, seed=0, epoch=0)
        assert [len(b.new) for b in batches] == [8] * 5
        assert all(not b.replay for b in batches)


def test_cap_keeps_a_task_balanced_subset() -> None:
    pool = pool_of({"a": 500, "b": 20, "c": 500})
    chosen = cap_pool(pool, replay_spec(cap=100), seed=0)
    assert len(chosen) == 100 == len(set(chosen))
    counts = Counter(pool[i].task for i in chosen)
    assert counts["b"] == 20 and counts["a"] == counts["c"] == 40
    assert chosen == cap_pool(pool, replay_spec(cap=100), seed=0)
    assert cap_pool(pool, replay_spec(enabled=False), seed=0) == []


def test_split_and_spec_validation() -> None:
    assert split_batch(8, 1.0) == (4, 4)
    assert split_batch(8, 0.0) == (8, 0)
    assert split_batch(1, 3.0) == (1, 0)  # a new example in every batch, whatever the ratio
    with pytest.raises(ValueError, match="ratio"):
        replay_spec(ratio=-1)
    with pytest.raises(ValueError, match="cap"):
        replay_spec(cap=-5)
    with pytest.raises(ValueError, match="batch_size"):
        split_batch(0, 1.0)


def test_the_past_a_cycle_samples_is_seeded_and_task_balanced(
    tmp_path: Path, store_url: str | None
) -> None:
    with ExampleStore.in_state_dir(tmp_path, store_url) as store:
        store.add(_records("big", 500))
        store.add(_records("mid", 60))
        store.add(_records("small", 5))
        sample = sample_past(store, 90, 7, store.max_seq())
        assert len(sample) == 90 and len({e.id for e in sample}) == 90
        assert Counter(e.task for e in sample) == {"big": 43, "mid": 42, "small": 5}
        assert [e.id for e in sample_past(store, 90, 7, store.max_seq())] == [e.id for e in sample]
        assert [e.id for e in sample_past(store, 90, 8, store.max_seq())] != [e.id for e in sample]
        mark = store.max_seq()
        store.add(_records("late", 50))
        assert {e.task for e in sample_past(store, 30, 1, mark)} <= {
            "big",
            "mid",
            "small",
        }
        assert len(sample_past(store, 10_000, 1, store.max_seq())) == 615


def test_balanced_quota_water_fills() -> None:
    assert _balanced_quota({"a": 100, "b": 1, "c": 0}, 10) == {"a": 9, "b": 1, "c": 0}
    assert _balanced_quota({"a": 3, "b": 3}, 10) == {"a": 3, "b": 3}
    assert _balanced_quota({"a": 10, "b": 10, "c": 10}, 7) == {"a": 3, "b": 2, "c": 2}


def _records(task: str, n: int) -> list[Record]:
    rows = [
        {"task": task, "instruction": "Echo.", "input": f"{task}-{i}", "output": str(i)}
        for i in range(n)
    ]
    return [record_from_obj({**row, "split": "train"}) for row in rows]
