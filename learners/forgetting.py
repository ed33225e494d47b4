"""Continual-learning metrics from an accuracy matrix.

``R[i][j]`` is the score on task ``j`` after training on task ``i`` (tasks in training
order, a square matrix). Definitions follow avalanche-lib's
``evaluation/metrics/forgetting_bwt.py`` (and Lopez-Paz & Ranzato, 2017, GEM):

* forgetting of task j = R[j][j] − R[T−1][j], the score just after learning j minus the
  final score, for every j < T−1 (the last task has had no chance to be forgotten);
* stream forgetting = mean of those; BWT = −forgetting (negative BWT means forgetting);
* AA (average accuracy) = mean of the last row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ContinualMetrics:
    """Summary of one run's accuracy matrix (same units as the matrix)."""

    aa: float
    bwt: float
    forgetting: tuple[float, ...]  # one per task j < T-1, in training order

    @property
    def mean_forgetting(self) -> float:
        return -self.bwt


def _check(matrix: Sequence[Sequence[float]]) -> int:
    t = len(matrix)
    if t == 0:
        raise ValueError("accuracy matrix is empty: train and evaluate at least one task")
    for i, row in enumerate(matrix):
        if len(row) != t:
            raise ValueError(
                f"accuracy matrix must be square (T x T, T={t}); row {i} has {len(row)} entries"
            )
    return t


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """AA: mean score over all tasks after the last training step (the last row)."""
    t = _check(matrix)
    return sum(matrix[-1]) / t


def forgetting_per_task(matrix: Sequence[Sequence[float]]) -> list[float]:
    """R[j][j] − R[T−1][j] for each task j < T−1 (positive: the task was forgotten)."""
    t = _check(matrix)
    return [matrix[j][j] - matrix[t - 1][j] for j in range(t - 1)]


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """BWT: mean over j < T−1 of R[T−1][j] − R[j][j]; 0.0 for a single task."""
    per_task = forgetting_per_task(matrix)
    if not per_task:
        return 0.0
    return 0.0 - sum(per_task) / len(per_task)  # 0.0 - x: no "-0.0" in reports


def continual_metrics(matrix: Sequence[Sequence[float]]) -> ContinualMetrics:
    """AA, BWT and per-task forgetting of one accuracy matrix."""
    return ContinualMetrics(
        aa=average_accuracy(matrix),
        bwt=backward_transfer(matrix),
        forgetting=tuple(forgetting_per_task(matrix)),
    )
