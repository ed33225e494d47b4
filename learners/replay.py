"""Replay memory: what a cycle remembers of the past, and the batches that mix it in.

One place decides which past examples a cycle uses and how many, for training and for the
EWC Fisher: ``sample_past`` reads a task-balanced sample of the records the champion learned
(the store only returns rows), ``remember`` splits it into what is replayed in batches (at
most ``replay.cap``) and what the Fisher is estimated on (at most ``ewc.fisher_samples``).

Each micro-batch holds ``batch_size`` examples; about ``ratio`` of them are replayed per new
one (``ratio=1`` → half new, half replayed). Replayed examples are drawn task-balanced from
the pool (round-robin over tasks, each task's examples in a seeded shuffled order) so a task
with many stored examples cannot crowd out a small one. Everything is a pure function of
(sizes, spec, seed, epoch): the recipe recomputes the plan on resume instead of saving it,
and nothing here holds or mutates state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from aftertune.learners.data import ExampleLike
from aftertune.learners.training_specs import EwcSpec, ReplaySpec
from aftertune.store.examples import Example, ExampleStore

ExampleT = TypeVar("ExampleT", bound=ExampleLike)


@dataclass(frozen=True)
class Memory(Generic[ExampleT]):
    """What one cycle remembers: examples replayed in batches, examples the Fisher is taken on."""

    replay: list[ExampleT]
    fisher: list[ExampleT]


def past_wanted(replay: ReplaySpec, ewc: EwcSpec | None) -> int:
    """How many past records a cycle reads: enough for its replay and for its Fisher."""
    replayed = replay.cap if replay.enabled else 0
    fisher = ewc.fisher_samples if ewc is not None and ewc.enabled else 0
    return max(replayed, fisher)


def sample_past(store: ExampleStore, n: int, seed: int, until: int) -> list[Example]:
    """A seeded sample of ``n`` train records with ``seq <= until``, every task an equal share
    (a task with fewer records gives its unused share to the others)."""
    if n <= 0 or until <= 0:
        return []
    quota = _balanced_quota(store.train_counts(until), n)
    return [
        example
        for task in sorted(quota)
        for example in store.sample_train(task, quota[task], f"replay:{seed}:{task}", until)
    ]


def remember(
    past: Sequence[ExampleT], replay: ReplaySpec, ewc: EwcSpec | None, seed: int
) -> Memory[ExampleT]:
    """Split the sampled past into what is replayed and what the Fisher is estimated on."""
    replayed = [past[i] for i in cap_pool(past, replay, seed)]
    fisher: list[ExampleT] = []
    if ewc is not None and ewc.enabled and past:
        # An even stride over the sample keeps every task in it when it is capped.
        stride = max(1, len(past) // ewc.fisher_samples)
        fisher = list(past[::stride])[: ewc.fisher_samples]
    return Memory(replayed, fisher)


@dataclass(frozen=True)
class MixedBatch:
    """Indices of one micro-batch: into the new examples and into the (capped) replay pool."""

    new: tuple[int, ...]
    replay: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.new) + len(self.replay)


def split_batch(batch_size: int, ratio: float) -> tuple[int, int]:
    """(new, replayed) examples per micro-batch of ``batch_size`` for a replay ratio."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    new = max(1, round(batch_size / (1.0 + ratio)))
    return new, batch_size - new


def cap_pool(pool: Sequence[ExampleLike], spec: ReplaySpec, seed: int) -> list[int]:
    """Indices of the pool examples this cycle may replay: at most ``cap``, task-balanced."""
    if not spec.enabled or spec.ratio == 0 or spec.cap == 0:
        return []
    if len(pool) <= spec.cap:
        return list(range(len(pool)))
    rng = random.Random(f"replay-cap:{seed}")
    by_task = _by_task(pool)
    for idx in by_task.values():
        rng.shuffle(idx)
    # Round-robin over tasks: a task with fewer examples gives its unused share to the rest.
    chosen: list[int] = []
    depth = 0
    while len(chosen) < spec.cap:
        for task in sorted(by_task):
            if depth < len(by_task[task]) and len(chosen) < spec.cap:
                chosen.append(by_task[task][depth])
        depth += 1
    return sorted(chosen)


def mix_batches(
    new: Sequence[ExampleLike],
    pool: Sequence[ExampleLike],
    spec: ReplaySpec,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
) -> list[MixedBatch]:
    """One epoch over the new examples (seeded shuffle) with replayed examples mixed in.

    ``pool`` should already be capped (see ``cap_pool``); ``MixedBatch.replay`` indexes it.
    The last batch may be short: every new example is seen exactly once per epoch.
    """
    if not new:
        return []
    rng = random.Random(f"replay-mix:{seed}:{epoch}")
    active = spec.enabled and spec.ratio > 0 and len(pool) > 0
    n_new, _ = split_batch(batch_size, spec.ratio if active else 0.0)
    order = list(range(len(new)))
    rng.shuffle(order)
    draw = _BalancedDraw(pool, rng) if active else None
    batches: list[MixedBatch] = []
    owed = 0.0  # replay owed so far, so short last batches keep the ratio on average
    for start in range(0, len(order), n_new):
        chunk = tuple(order[start : start + n_new])
        replay: tuple[int, ...] = ()
        if draw is not None:
            owed += len(chunk) * spec.ratio
            k = min(int(owed + 1e-9), batch_size - len(chunk))
            # Carry at most one owed example: a ratio the batch size cannot hold is capped, not
            # paid back in one oversized last batch.
            owed = min(owed - k, 1.0)
            replay = tuple(draw.take(k))
        batches.append(MixedBatch(new=chunk, replay=replay))
    return batches


def _by_task(pool: Sequence[ExampleLike]) -> dict[str, list[int]]:
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(pool):
        by_task.setdefault(ex.task, []).append(i)
    return by_task


class _BalancedDraw:
    """Endless task-balanced draws: round-robin over tasks, reshuffling a task when it runs out."""

    def __init__(self, pool: Sequence[ExampleLike], rng: random.Random) -> None:
        self._rng = rng
        self._tasks = sorted(_by_task(pool).items())
        self._queues: list[list[int]] = [[] for _ in self._tasks]
        self._turn = rng.randrange(len(self._tasks))

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        for _ in range(k):
            t = self._turn % len(self._tasks)
            self._turn += 1
            if not self._queues[t]:
                fresh = list(self._tasks[t][1])
                self._rng.shuffle(fresh)
                self._queues[t] = fresh
            out.append(self._queues[t].pop())
        return out


def _balanced_quota(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over tasks as evenly as their sizes allow (water-filling)."""
    quota = {task: 0 for task in sizes}
    remaining = min(n, sum(sizes.values()))
    open_tasks = sorted(t for t, size in sizes.items() if size > 0)
    while remaining > 0 and open_tasks:
        share, extra = divmod(remaining, len(open_tasks))
        for i, task in enumerate(open_tasks):
            give = min(share + (1 if i < extra else 0), sizes[task] - quota[task])
            quota[task] += give
            remaining -= give
        open_tasks = [t for t in open_tasks if quota[t] < sizes[t]]
    return quota
