"""Settings → the learners' specs: only what one section cannot say alone.

Most sections already are the learners' specs (``[lora]`` is a ``LoraSpec``, ...: each knob
is declared once, in the learners). What is derived here: ``train.lr`` and ``train.epochs``
left unset take the model kind's defaults; training, evaluation and export render the
``[prompt]`` template; evaluation truncates at ``train.max_length`` and scores
``gate.max_per_task`` held-out examples per task; the gate's thresholds for every task and
each task's own; a disabled export is no export spec.

Imports torch (through learners): only the commands that learn, and the benches, load it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aftertune.daemon.settings import Settings
from aftertune.learners.evaluate import EvalOptions, EvalSpec
from aftertune.learners.export import ExportOptions, ExportSpec
from aftertune.learners.gate import GateOptions, GateRules, MetricRules
from aftertune.learners.kinds import kind_for
from aftertune.learners.specs import LearningSpecs
from aftertune.learners.training_specs import TrainOptions, TrainSpec
from aftertune.store.prompt import PromptTemplate

__all__ = ["LearningSpecs", "default_specs", "specs_from"]


def _part(options: type[Any], section: object) -> dict[str, Any]:
    """The values of ``section`` that the spec class ``options`` declares (``section`` is an
    instance of it, or of a settings class built on it)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(options)}


def _by_kind(settings: Settings) -> dict[str, Any]:
    """train.lr and train.epochs: as set, else the default of ``model.base``'s kind."""
    defaults = kind_for(settings.model.base).train_defaults
    train = settings.train
    return {"lr": train.lr or defaults["lr"], "epochs": train.epochs or defaults["epochs"]}


def _template(settings: Settings) -> PromptTemplate:
    """[prompt] as set, else the default of ``model.base``'s kind."""
    default = kind_for(settings.model.base).default_prompt(settings.model.base)
    return PromptTemplate(
        settings.prompt.with_input or default.with_input,
        settings.prompt.without_input or default.without_input,
    )


def specs_from(settings: Settings) -> LearningSpecs:
    """Every spec a learning cycle takes, from ``settings`` (the learners never see them)."""
    template = _template(settings)
    gate = settings.gate
    rules = GateRules(
        **_part(GateOptions, gate),
        default=MetricRules(**_part(MetricRules, gate)),
        per_task=gate.tasks,
    )
    return LearningSpecs(
        base=settings.model.base,
        lora=settings.lora,
        train=TrainSpec(
            **{**_part(TrainOptions, settings.train), **_by_kind(settings)},
            template=template,
        ),
        replay=settings.replay,
        ewc=settings.ewc,
        eval=EvalSpec(
            **_part(EvalOptions, settings.eval),
            max_length=settings.train.max_length,
            max_per_task=gate.max_per_task,
            template=template,
        ),
        rules=rules,
        ranking=settings.ranking,
        export=(
            ExportSpec(**_part(ExportOptions, settings.export), template=template)
            if settings.export.enabled
            else None
        ),
        keep_bundles=settings.export.keep,
        publisher=settings.redis.consumer,
    )


def default_specs() -> LearningSpecs:
    """The specs of the shipped defaults (plus what the environment sets, as for the daemon)."""
    return specs_from(Settings())
