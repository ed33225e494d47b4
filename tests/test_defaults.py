"""One source of defaults: the settings. Specs carry none; every path builds them the same way.

A default written twice drifts (ours did: lr 4e-3 in the settings, 1e-3 in TrainSpec). These
tests fail when a spec grows a default, when a setting does not reach its spec, or when a
bench runs a configuration the daemon does not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from spec_fixtures import DEFAULTS

from aftertune.daemon.settings import Settings, load_settings
from aftertune.daemon.specs import specs_from
from aftertune.learners.evaluate import EvalSpec
from aftertune.learners.ewc import EwcSpec
from aftertune.learners.export import ExportSpec
from aftertune.learners.gate import GateRules
from aftertune.learners.lora import LoraSpec
from aftertune.learners.recipe import TrainSpec
from aftertune.learners.replay import ReplaySpec
from aftertune.learners.specs import LearningSpecs
from aftertune.store.prompt import PromptTemplate

BENCH = Path(__file__).resolve().parents[1] / "bench"
SPECS = (LoraSpec, TrainSpec, ReplaySpec, EwcSpec, EvalSpec, ExportSpec, GateRules, LearningSpecs)


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}_defaults", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.__name__)
def test_specs_carry_no_defaults(spec: type) -> None:
    defaulted = [
        f.name
        for f in dataclasses.fields(spec)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert defaulted == [], f"{spec.__name__} defaults {defaulted}: take them from the settings"


def _same(setting: Any, spec_value: Any) -> bool:
    return (tuple(setting) if isinstance(setting, list) else setting) == spec_value


def test_every_setting_reaches_its_spec_unchanged() -> None:
    settings = Settings()
    specs = specs_from(settings)
    assert specs.export is not None
    for section, spec, skip in (
        (settings.lora, specs.lora, {"alpha"}),  # None in the settings: 2 * r in the spec
        (settings.train, specs.train, {"lr", "epochs"}),  # None: the model kind's default
        (settings.replay, specs.replay, set()),
        (settings.ewc, specs.ewc, set()),
        (settings.eval, specs.eval, set()),
        (settings.export, specs.export, {"enabled", "keep"}),
    ):
        for name, value in section.model_dump().items():
            if name not in skip:
                assert _same(value, getattr(spec, name)), (type(section).__name__, name)
    assert specs.lora.alpha == 2 * settings.lora.r
    gate = settings.gate
    assert dict(specs.rules.default.max_drop) == gate.max_drop
    assert dict(specs.rules.default.max_drop_rel) == gate.max_drop_rel
    for name in ("min_gain", "min_nll_gain", "noise_z", "max_conflict_share", "require_approval"):
        assert getattr(specs.rules, name) == getattr(gate, name), name
    assert specs.rules.max_nll_rise_same_task == gate.max_nll_rise_same_task
    assert specs.eval.max_per_task == gate.max_per_task
    assert specs.eval.max_length == settings.train.max_length
    assert specs.keep_bundles == settings.export.keep
    assert specs.base == settings.model.base


def test_the_shipped_defaults_are_the_ones_the_issue_named() -> None:
    """The daemon's values won where settings and specs disagreed (issue 11)."""
    specs = specs_from(Settings())
    assert specs.train.lr == 4e-3 and specs.train.checkpoint_every == 25
    assert specs.train.epochs == 3
    assert specs.ewc.lam == 1e2 and specs.ewc.fisher_samples == 64


def test_a_configured_prompt_reaches_training_evaluation_and_export() -> None:
    custom = {
        "with_input": "Q: {instruction} [{input}]\nA: ",
        "without_input": "Q: {instruction}\nA: ",
    }
    specs = specs_from(load_settings(overrides={"prompt": custom, "train": {"schedule": "linear"}}))
    template = PromptTemplate(**custom)
    assert specs.export is not None
    assert specs.train.template == specs.eval.template == specs.export.template == template
    assert specs.train.schedule == "linear"


def test_per_task_gate_overrides_and_disabled_export_map_through() -> None:
    settings = load_settings(
        overrides={
            "gate": {"tasks": {"noisy": {"max_drop": {"accuracy": 0.5}}}},
            "export": {"enabled": False},
        }
    )
    specs = specs_from(settings)
    assert specs.export is None
    assert specs.rules.for_task("noisy").max_drop["accuracy"] == 0.5
    assert specs.rules.for_task("other").max_drop["accuracy"] == 0.05


def test_the_test_defaults_are_the_daemon_defaults() -> None:
    assert specs_from(Settings()) == DEFAULTS


def test_bench_continual_runs_the_daemon_configuration() -> None:
    continual = _bench("continual")
    cfg = continual.BenchConfig.of(DEFAULTS)
    args = continual._parser(cfg, DEFAULTS.base).parse_args(["--data", "d", "--tasks", "t"])
    flags = {
        f: getattr(args, f) for f in continual.BenchConfig.__dataclass_fields__ if hasattr(args, f)
    }
    assert dataclasses.replace(cfg, **flags) == cfg  # the flags' defaults change nothing
    specs = continual._specs(cfg, DEFAULTS, steps=None, replay=True, ewc=True, seed=cfg.seed)
    assert specs["lora"] == DEFAULTS.lora
    assert specs["replay_spec"] == DEFAULTS.replay and specs["ewc"] == DEFAULTS.ewc
    # Only what a benchmark must differ in: no progress bars, and CPU unless --device says.
    assert specs["train"] == dataclasses.replace(DEFAULTS.train, progress=False, device="cpu")
    assert args.base == DEFAULTS.base


def test_bench_gate_runs_the_daemon_configuration() -> None:
    gate = _bench("gate")
    specs = gate.gate_specs(DEFAULTS, 7)
    assert specs.train == dataclasses.replace(DEFAULTS.train, max_steps=7, progress=False)
    assert dataclasses.replace(specs, train=DEFAULTS.train, export=DEFAULTS.export) == DEFAULTS


def test_eval_and_the_gate_cap_held_out_examples_the_same_way(tmp_path: Path) -> None:
    """`aftertune eval` scores what the gate scores: the first max_per_task of each task."""
    from aftertune.learners.cycle import suites_for
    from aftertune.learners.evaluate import held_out
    from aftertune.store.examples import ExampleStore
    from aftertune.store.records import record_from_obj

    rows = [
        {"task": task, "instruction": "i", "input": str(k), "output": "o", "split": "test"}
        for k in range(5)
        for task in ("a", "b")
    ]
    with ExampleStore(tmp_path / "examples.sqlite3") as store:
        store.add([record_from_obj(r) for r in rows])
        evaluated = held_out(store, 3)
        suites = suites_for(store, 0, store.max_seq(), 3)
    assert {t: len(v) for t, v in evaluated.items()} == {"a": 3, "b": 3}
    assert suites["gain"] == evaluated and suites["regression"] == {}


def test_unset_lr_and_epochs_follow_the_model_kind() -> None:
    ranking = specs_from(Settings(model={"base": "embedded:minilm"}))
    assert (ranking.train.lr, ranking.train.epochs) == (2e-3, 2)
    chosen = specs_from(Settings(model={"base": "embedded:minilm"}, train={"lr": 0.1, "epochs": 4}))
    assert (chosen.train.lr, chosen.train.epochs) == (0.1, 4)
