"""What a learning cycle is told, as plain frozen dataclasses (the learners never see Settings).

Each piece lives with the code it tunes (``LoraSpec`` in lora.py, ``TrainSpec`` in
recipe.py, ...); this module holds the evaluation spec and the bundle of all of them that
the cycle, the candidate trainer and promotion take. None of them carries defaults: the
daemon's settings are the one source, and ``aftertune.daemon.specs.specs_from`` builds
these from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from aftertune.learners.evaluate import EvalSpec
from aftertune.learners.ewc import EwcSpec
from aftertune.learners.export import ExportSpec
from aftertune.learners.gate import GateRules
from aftertune.learners.lora import LoraSpec
from aftertune.learners.ranking import RankingSpec
from aftertune.learners.recipe import TrainSpec
from aftertune.learners.replay import ReplaySpec


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
