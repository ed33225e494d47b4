from __future__ import annotations

from pathlib import Path

from aftertune.store.examples import Added, ExampleStore
from aftertune.store.records import Record, record_from_obj


def _records(task: str, n: int, split: str = "train", start: int = 0) -> list[Record]:
    return [
        record_from_obj(
            {
                "task": task,
                "instruction": "Echo.",
                "input": f"{task}-{i}",
                "output": str(i),
                "split": split,
            }
        )
        for i in range(start, start + n)
    ]


def test_add_is_idempotent_and_counts(tmp_path: Path, store_url: str | None) -> None:
    with ExampleStore.in_state_dir(tmp_path, store_url) as store:
        assert store.add(_records("a", 10)) == Added(stored=10, duplicates=0)
        assert store.add(_records("a", 10)) == Added(stored=0, duplicates=10)  # redelivery
        assert store.add(_records("a", 12)) == Added(stored=2, duplicates=10)
        store.add(_records("b", 3, split="test"))
        assert store.counts() == {"a": {"train": 12, "test": 0}, "b": {"train": 0, "test": 3}}
        assert store.total() == 15
    with ExampleStore.in_state_dir(tmp_path, store_url) as reopened:  # durable
        assert reopened.total() == 15


def test_train_after_watermark_and_held_out(tmp_path: Path, store_url: str | None) -> None:
    with ExampleStore.in_state_dir(tmp_path, store_url) as store:
        store.add(_records("a", 5))
        mark = store.max_seq()
        store.add(_records("b", 4))
        store.add(_records("b", 2, split="test", start=100))
        new = store.train_after(mark)
        assert [e.task for e in new] == ["b"] * 4
        assert store.count_train_after(mark) == 4
        assert [e.input for e in store.held_out("b")] == ["b-100", "b-101"]
        assert store.held_out(after=store.max_seq()) == []
        assert store.tasks(max_seq=mark) == ["a"]


def test_quarantined_batches_are_neither_trained_replayed_nor_evaluated(
    tmp_path: Path, store_url: str | None
) -> None:
    with ExampleStore.in_state_dir(tmp_path, store_url) as store:
        store.add(_records("a", 20) + _records("a", 5, split="test", start=100))
        mark = store.max_seq()
        store.add(_records("a", 10, start=200) + _records("a", 3, split="test", start=300))
        assert store.quarantine(mark, store.max_seq(), version=2) == 13
        assert store.quarantine(mark, store.max_seq(), version=3) == 0  # already set aside
        assert store.quarantined() == {2: 13}
        assert store.train_after(0) == store.train_after(0, until=mark)
        assert store.count_train_after(mark) == 0
        assert len(store.held_out("a")) == 5
        assert all(e.seq <= mark for e in store.sample_train("a", 100, "s", store.max_seq()))
        assert store.total() == 38  # kept for inspection


def test_conflicts_count_new_records_that_relabel_stored_inputs(
    tmp_path: Path, store_url: str | None
) -> None:
    with ExampleStore.in_state_dir(tmp_path, store_url) as store:
        store.add(_records("a", 10))
        mark = store.max_seq()
        relabelled = [
            record_from_obj({"task": "a", "instruction": "Echo.", "input": f"a-{i}", "output": "x"})
            for i in range(4)
        ]
        store.add(relabelled + _records("a", 6, start=50) + _records("b", 3))
        assert store.conflicts(mark, store.max_seq()) == {"a": (10, 4), "b": (3, 0)}
        assert store.conflicts(0, mark) == {"a": (10, 0)}


def test_quarantine_by_task_with_its_reason_and_release_as_new_data(
    tmp_path: Path, store_url: str | None
) -> None:
    with ExampleStore.in_state_dir(tmp_path, store_url) as store:
        store.add(_records("a", 5) + _records("b", 5))
        mark = store.max_seq()
        n = store.quarantine(0, mark, 0, tasks=["b"], reason="relabels stored data")
        assert n == 5 and store.counts()["b"] == {"train": 0, "test": 0}
        assert store.quarantined_counts() == {"b": 5}
        (batch,) = store.quarantine_summary()
        assert (batch.version, batch.task, batch.reason, batch.count) == (
            0,
            "b",
            "relabels stored data",
            5,
        )
        assert store.release(task="b") == 5  # back as new data, after everything stored
        assert [e.task for e in store.train_after(mark)] == ["b"] * 5
        store.add(_records("c", 1))
        assert store.train_after(store.max_seq() - 1)[0].task == "c"  # seqs keep rising
        assert store.quarantine_summary() == [] and store.quarantined_counts() == {}
