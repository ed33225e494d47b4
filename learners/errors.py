"""Named exceptions of aftertune.learners; each message says what was wrong and what to do."""

from __future__ import annotations

import math


class LearnerError(Exception):
    """Base class for errors raised by aftertune.learners."""


class BaseModelError(LearnerError):
    """The configured base model cannot be found or is not a Hugging Face causal LM."""


class FisherMismatch(LearnerError):
    """A stored EWC Fisher does not fit the model or adapter (other base model or targets)."""


class CheckpointError(LearnerError):
    """A training checkpoint cannot be read or belongs to another run."""


class ChampionError(LearnerError):
    """An adapter of the champion chain is missing or unreadable."""


class TrainingInterrupted(LearnerError):
    """Training stopped at a step boundary on request (warm stop); resume from the checkpoint."""

    def __init__(self, step: int, checkpoint_dir: object = None, why: str = "") -> None:
        where = f"; resume from {checkpoint_dir}" if checkpoint_dir else " (no checkpoint dir set)"
        super().__init__(f"training stopped at step {step}{where}" + (f": {why}" if why else ""))
        self.step = step
        self.checkpoint_dir = checkpoint_dir


class ExportError(LearnerError):
    """Export or its parity check failed; the message is the candidate's rejection reason."""


class NothingToTrain(LearnerError):
    """No new train examples arrived since the champion was made."""


class DataRejected(NothingToTrain):
    """The data checks rejected every task with new records, before any training: their
    records are quarantined (``reasons``: one per task)."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("rejected before training: " + "; ".join(reasons))
        self.reasons = reasons


class CycleBlocked(LearnerError):
    """A cycle cannot start now (a version awaits a human decision)."""


class NonFiniteLoss(LearnerError):
    """Training met a loss that is not a finite number (inf or NaN) and stopped.

    No candidate is made, so nothing is rejected and no record is quarantined: the cause is
    a setting or a record to fix, not a batch to set aside. The message names the step and
    what the batch held.
    """

    def __init__(
        self, step: int, value: float, weights: list[float], tasks: list[str], term: str = "loss"
    ) -> None:
        named = sorted(set(tasks))
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        low, high = min(weights, default=1.0), max(weights, default=1.0)
        if high > 1000 or not math.isfinite(high):
            cause = (
                f"an example weight of {high:g} is too large to train on (float32); weights "
                "above 1000 are refused at ingest now, so this record came in before: find "
                "it by its weight in examples.sqlite3 and lower it or delete it"
            )
        else:
            cause = "the model diverged: lower train.lr or set train.max_grad_norm"
        super().__init__(
            f"training {term} is {value} at step {step} (batch of {len(weights)} examples"
            f" of {shown}, weights {low:g} to {high:g}): {cause}; no candidate was made and"
            " no record was quarantined"
        )
        self.step = step
        self.weights = weights
