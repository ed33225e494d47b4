"""Learner specs for tests: the daemon's defaults (the one source of them) with a test's changes.

``dataclasses.replace`` runs each spec's ``__post_init__``, so a bad change raises as a
spec built by hand would.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aftertune.daemon.specs import default_specs
from aftertune.learners.export import ExportSpec
from aftertune.learners.gate import GateRules
from aftertune.learners.training_specs import EwcSpec, LoraSpec, ReplaySpec, TrainSpec

DEFAULTS = default_specs()


def train_spec(**changes: Any) -> TrainSpec:
    return replace(DEFAULTS.train, **changes)


def lora_spec(**changes: Any) -> LoraSpec:
    # alpha None = 2 * r, as the settings say; the built default already resolved it for r=16.
    return replace(DEFAULTS.lora, **{"alpha": None, **changes})


def replay_spec(**changes: Any) -> ReplaySpec:
    return replace(DEFAULTS.replay, **changes)


def ewc_spec(**changes: Any) -> EwcSpec:
    return replace(DEFAULTS.ewc, **changes)


def export_spec(**changes: Any) -> ExportSpec:
    assert DEFAULTS.export is not None  # export is enabled by default
    return replace(DEFAULTS.export, **changes)


def gate_rules(**changes: Any) -> GateRules:
    return replace(DEFAULTS.rules, **changes)
