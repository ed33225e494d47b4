"""Named exceptions of aftertune.learners; each message says what was wrong and what to do."""

from __future__ import annotations


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

    def __init__(self, step: int, checkpoint_dir: object = None) -> None:
        where = f"; resume from {checkpoint_dir}" if checkpoint_dir else " (no checkpoint dir set)"
        super().__init__(f"training stopped at step {step}{where}")
        self.step = step
        self.checkpoint_dir = checkpoint_dir


class ExportError(LearnerError):
    """Export or its parity check failed; the message is the candidate's rejection reason."""


class NothingToTrain(LearnerError):
    """No new train examples arrived since the champion was made."""


class CycleBlocked(LearnerError):
    """A cycle cannot start now (a version awaits a human decision)."""
