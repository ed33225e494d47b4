"""Settings → the learners' specs, in one place.

The settings are the one source of every default; the learners' spec dataclasses carry none.
Fields are copied by name: a spec field that no setting fills, or a setting that no spec
takes, is an error here rather than a value silently dropped.

Imports torch (through learners): only the commands that learn, and the benches, load it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel

from aftertune.daemon.settings import KIND_TRAIN_DEFAULTS, Settings, TaskGateSettings
from aftertune.learners.base_model import model_kind
from aftertune.learners.evaluate import EvalSpec
from aftertune.learners.ewc import EwcSpec
from aftertune.learners.export import ExportSpec
from aftertune.learners.gate import GateRules, MetricRules
from aftertune.learners.lora import LoraSpec
from aftertune.learners.ranking import RankingSpec
from aftertune.learners.recipe import TrainSpec
from aftertune.learners.replay import ReplaySpec
from aftertune.learners.specs import LearningSpecs
from aftertune.store.prompt import PromptTemplate

__all__ = ["LearningSpecs", "default_specs", "specs_from"]

SpecT = TypeVar("SpecT")


def _build(
    spec: type[SpecT], section: BaseModel, *, skip: Iterable[str] = (), **extra: Any
) -> SpecT:
    """``spec`` from the settings ``section`` field by field, plus ``extra`` for the rest.

    ``skip``: settings of the section that belong to another spec (they are named, so an
    unnamed new setting cannot be forgotten).
    """
    names = {f.name for f in dataclasses.fields(spec)}  # type: ignore[arg-type]
    values = section.model_dump(exclude=set(skip))
    unused = set(values) - names
    if unused:
        raise TypeError(f"{spec.__name__} takes no {sorted(unused)} from the settings")
    missing = names - set(values) - set(extra)
    if missing:
        raise TypeError(f"{spec.__name__} gets no {sorted(missing)} from the settings")
    return spec(**values, **extra)


def _metric_rules(section: TaskGateSettings) -> MetricRules:
    return _build(MetricRules, section, skip=_GATE_ONLY)


# Settings of [gate] that are not per-metric thresholds: they go to GateRules or EvalSpec.
_GATE_ONLY = (
    "min_gain",
    "min_nll_gain",
    "noise_z",
    "max_nll_rise_same_task",
    "max_conflict_share",
    "beat_chance",
    "chance_z",
    "require_approval",
    "max_per_task",
    "tasks",
)


# Train settings whose unset value depends on the model kind (settings.KIND_TRAIN_DEFAULTS).
_BY_KIND = ("lr", "epochs")


def _by_kind(settings: Settings) -> dict[str, Any]:
    """train.lr and train.epochs: as set, else the default of ``model.base``'s kind."""
    defaults = KIND_TRAIN_DEFAULTS[model_kind(settings.model.base)]
    return {name: getattr(settings.train, name) or defaults[name] for name in _BY_KIND}


def specs_from(settings: Settings) -> LearningSpecs:
    """Every spec a learning cycle takes, from ``settings`` (the learners never see them)."""
    template = PromptTemplate(**settings.prompt.model_dump())
    gate = settings.gate
    rules = _build(
        GateRules,
        gate,
        skip=("floor", "max_drop", "max_drop_rel", "max_per_task", "tasks"),
        default=_metric_rules(gate),
        per_task={task: _metric_rules(t) for task, t in gate.tasks.items()},
    )
    export = _build(ExportSpec, settings.export, skip=("enabled", "keep"), template=template)
    return LearningSpecs(
        base=settings.model.base,
        lora=_build(LoraSpec, settings.lora),
        train=_build(
            TrainSpec, settings.train, skip=_BY_KIND, template=template, **_by_kind(settings)
        ),
        replay=_build(ReplaySpec, settings.replay),
        ewc=_build(EwcSpec, settings.ewc),
        eval=_build(
            EvalSpec,
            settings.eval,
            max_length=settings.train.max_length,
            max_per_task=gate.max_per_task,
            template=template,
        ),
        rules=rules,
        ranking=_build(RankingSpec, settings.ranking),
        export=export if settings.export.enabled else None,
        keep_bundles=settings.export.keep,
    )


def default_specs() -> LearningSpecs:
    """The specs of the shipped defaults (plus what the environment sets, as for the daemon)."""
    return specs_from(Settings())
