"""What a learning cycle is told: every spec, in one value (the learners never see Settings).

Each spec is declared once, with its defaults and bounds, beside what it tunes
(``training_specs.py``: LoRA, training, replay, EWC; ``evaluate.py``, ``gate.py``,
``export.py``); the daemon's settings sections are those classes, and
``aftertune.daemon.specs.specs_from`` adds what one section cannot say alone. This module
holds ``RankingSpec`` (the settings' ``[ranking]``) and the bundle of all of them that the
cycle, the candidate trainer and promotion take. Torch-free: the settings import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field
from pydantic.dataclasses import dataclass as spec_dataclass

from aftertune.learners.evaluate import EvalSpec
from aftertune.learners.export import ExportSpec
from aftertune.learners.gate import GateRules
from aftertune.learners.spec_config import SPEC_CONFIG
from aftertune.learners.training_specs import EwcSpec, LoraSpec, ReplaySpec, TrainSpec


@spec_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class RankingSpec:
    """``[ranking]``: how the ranking kind (a sentence-encoder base such as embedded:minilm)
    scores answers."""

    temperature: float = Field(
        default=0.05, gt=0, description="cosine / temperature → softmax (training and scoring)"
    )
    max_candidates: int = Field(
        default=256, ge=2, description="more distinct outputs: a free-text task, refused"
    )
    exemplars: int = Field(
        default=128,
        ge=0,
        description="train prompts per answer, on average (a seeded sample of this many times"
        " a task's candidates), whose mean embedding is the answer's prototype; 0: answers"
        " are matched to their own text",
    )


@dataclass(frozen=True)
class LearningSpecs:
    """Everything one learning cycle needs besides the store, the registry and the state dir."""

    base: str  # "embedded:tiny" or a local Hugging Face model dir
    lora: LoraSpec
    train: TrainSpec
    replay: ReplaySpec
    ewc: EwcSpec
    eval: EvalSpec
    rules: GateRules
    ranking: RankingSpec  # how the ranking kind scores (unused by a generative base)
    export: ExportSpec | None  # None: export disabled, a promotion publishes no bundle
    keep_bundles: int  # published bundles kept, the latest included
    # Who publishes the bundles (the daemon's redis.consumer name): the registry records it
    # beside each promoted version's manifest sha256, and other daemons pull from it only.
    publisher: str = "daemon"
