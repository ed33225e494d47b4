"""Which records a version has learned, per task, and which are new to it.

A version learned every live train record up to its ``data_seq``, except for the tasks it
held back (``lineage["held_back"]``: task → the seq up to which that task was learned): a
task still waiting for held-out data, left out of that cycle's training, keeps its old
watermark, so its records stay new until a cycle can judge them. ``Watermarks.of(champion)``
says, for every task, after which seq its records are new.

The gate's two suites follow the same marks: *regression* is each task's held-out records up
to its mark (what the champion was judged on), *gain* those after it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from aftertune.store.examples import Example, ExampleStore
from aftertune.store.registry import Version

Suites = dict[str, dict[str, list[Example]]]  # suite -> task -> held-out examples


@dataclass(frozen=True)
class Watermarks:
    """After which seq each task's records are new: ``base``, or a held-back task's own."""

    base: int = 0
    held_back: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, version: Version | None) -> Watermarks:
        if version is None:
            return cls()
        held = version.lineage.get("held_back") or {}
        return cls(version.data_seq, {str(t): int(s) for t, s in held.items()})

    def mark(self, task: str) -> int:
        return self.held_back.get(task, self.base)

    @property
    def lowest(self) -> int:
        return min([self.base, *self.held_back.values()])

    def holding_back(self, tasks: Collection[str]) -> dict[str, int]:
        """What a version trained on top of these marks without ``tasks`` records as held back."""
        return {t: self.mark(t) for t in sorted(tasks)}


def new_train(
    store: ExampleStore, marks: Watermarks, until: int, without: Collection[str] = ()
) -> list[Example]:
    """Live train records new to ``marks`` up to ``until``, but those of ``without``."""
    return [
        ex
        for ex in store.train_after(marks.lowest, until)
        if ex.seq > marks.mark(ex.task) and ex.task not in without
    ]


def suites(store: ExampleStore, marks: Watermarks, until: int, cap: int) -> Suites:
    """Regression: each task's held-out records up to its mark; gain: those after it, up to
    ``until``. At most ``cap`` of each task in each suite, the first by arrival."""
    out: Suites = {"regression": {}, "gain": {}}
    for ex in store.held_out(until=until):
        suite = out["regression" if ex.seq <= marks.mark(ex.task) else "gain"]
        bucket = suite.setdefault(ex.task, [])
        if len(bucket) < cap:
            bucket.append(ex)
    return out


def conflicts(store: ExampleStore, marks: Watermarks, until: int) -> dict[str, tuple[int, int]]:
    """``ExampleStore.conflicts`` of each task's new records (after its own mark)."""
    out: dict[str, tuple[int, int]] = {}
    for mark in sorted({marks.base, *marks.held_back.values()}):
        for task, counts in store.conflicts(mark, until).items():
            if marks.mark(task) == mark:
                out[task] = counts
    return out
