"""Accuracy-matrix metrics: hand-computed cases and avalanche-lib's update protocol."""

from __future__ import annotations

import random

import pytest

from aftertune.learners.forgetting import (
    average_accuracy,
    backward_transfer,
    continual_metrics,
    forgetting_per_task,
)

# Rows: after training task i; columns: task j.
MATRIX = [
    [90.0, 10.0, 5.0],
    [60.0, 80.0, 20.0],
    [40.0, 70.0, 95.0],
]


def test_hand_computed_values() -> None:
    assert average_accuracy(MATRIX) == pytest.approx((40 + 70 + 95) / 3)
    # Task 0 lost 50 points, task 1 lost 10; the last task cannot have been forgotten yet.
    assert forgetting_per_task(MATRIX) == pytest.approx([50.0, 10.0])
    assert backward_transfer(MATRIX) == pytest.approx(-30.0)
    metrics = continual_metrics(MATRIX)
    assert metrics.mean_forgetting == pytest.approx(30.0)
    assert metrics.forgetting == pytest.approx((50.0, 10.0))


def test_improvement_on_old_tasks_is_positive_backward_transfer() -> None:
    matrix = [[50.0, 0.0], [70.0, 90.0]]
    assert backward_transfer(matrix) == pytest.approx(20.0)
    assert forgetting_per_task(matrix) == pytest.approx([-20.0])


def test_single_task_has_no_forgetting() -> None:
    assert backward_transfer([[77.0]]) == 0.0
    assert forgetting_per_task([[77.0]]) == []
    assert average_accuracy([[77.0]]) == 77.0


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [[1.0, 2.0], [3.0]]])
def test_non_square_matrix_is_rejected(bad: list[list[float]]) -> None:
    with pytest.raises(ValueError, match="matrix"):
        continual_metrics(bad)


def _avalanche_stream_bwt(matrix: list[list[float]]) -> float:
    """avalanche's StreamBWT, replayed: its Forgetting keeps `initial` (set when the evaluated
    experience is the one just trained) and `last` (reset before each eval); the stream value
    after the final eval is the mean of -(initial - last) over keys holding both."""
    initial: dict[int, float] = {}
    value = 0.0
    for train_exp, row in enumerate(matrix):
        last: dict[int, float] = {}
        gaps = []
        for eval_exp, acc in enumerate(row):
            if eval_exp == train_exp:
                initial[eval_exp] = acc
            else:
                last[eval_exp] = acc
            if eval_exp in initial and eval_exp in last:
                gaps.append(initial[eval_exp] - last[eval_exp])
        value = -sum(gaps) / len(gaps) if gaps else 0.0
    return value


def test_matches_avalanche_protocol_on_random_matrices() -> None:
    rng = random.Random(7)
    for size in range(1, 7):
        matrix = [[rng.uniform(0, 100) for _ in range(size)] for _ in range(size)]
        assert backward_transfer(matrix) == pytest.approx(_avalanche_stream_bwt(matrix))
