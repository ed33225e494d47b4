"""One source of each default: the learners' spec classes, which are the settings' sections.

A default written twice drifts (ours did: lr 4e-3 in the settings, 1e-3 in TrainSpec). Each
knob is now declared once; these tests check what is derived from it (a value set in one
section reaching the spec that takes it), that the shipped example config and the benches run
the daemon's configuration, and the defaults that measurements chose.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from spec_fixtures import DEFAULTS

from aftertune.daemon.settings import Settings, load_settings
from aftertune.daemon.specs import specs_from
from aftertune.store.prompt import PromptTemplate

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}_defaults", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_shipped_example_config_gives_the_specs_of_the_defaults() -> None:
    """systemd/aftertune.toml departs from the defaults only where its comments say."""
    shipped = load_settings(ROOT / "systemd" / "aftertune.toml")
    specs = specs_from(shipped)
    assert dataclasses.replace(specs, train=dataclasses.replace(specs.train, progress=True)) == (
        specs_from(Settings())
    )


def test_a_value_set_in_any_learner_section_reaches_its_spec() -> None:
    """One knob of each section, none at its default, and every value derived across sections."""
    settings = load_settings(
        overrides={
            "lora": {"r": 4},
            "train": {"seed": 7, "max_length": 64, "lr": 0.5, "epochs": 9},
            "replay": {"ratio": 0.5},
            "ewc": {"lam": 3.0},
            "eval": {"batch_size": 5},
            "gate": {"chance_z": 2.0, "floor": {"accuracy": 0.1}, "max_per_task": 11},
            "export": {"parity_prompts": 3, "keep": 2},
        }
    )
    specs = specs_from(settings)
    assert (specs.lora.r, specs.lora.alpha) == (4, 8)  # alpha unset: 2 * r
    assert (specs.train.seed, specs.train.lr, specs.train.epochs) == (7, 0.5, 9)
    assert specs.replay.ratio == 0.5 and specs.ewc.lam == 3.0
    assert (specs.eval.batch_size, specs.eval.max_length, specs.eval.max_per_task) == (5, 64, 11)
    assert specs.rules.chance_z == 2.0 and specs.rules.default.floor == {"accuracy": 0.1}
    assert specs.rules.default.max_drop == Settings().gate.max_drop
    assert specs.export is not None and specs.export.parity_prompts == 3
    assert specs.keep_bundles == 2 and specs.base == settings.model.base


def test_the_shipped_defaults_are_the_ones_the_issue_named() -> None:
    """The daemon's values won where settings and specs disagreed (issue 11)."""
    specs = specs_from(Settings())
    assert specs.train.lr == 4e-3 and specs.train.checkpoint_every == 25
    assert specs.train.epochs == 3
    assert specs.ewc.lam == 1e2 and specs.ewc.fisher_samples == 64


@pytest.mark.parametrize(
    ("section", "values", "why"),
    [
        ("train", {"device": "tpu"}, "device must be"),
        ("export", {"method": "torch", "precision": "int4"}, "exports fp32 only"),
        ("lora", {"target_modules": ["all-linear", "q_proj"]}, "stands alone"),
    ],
)
def test_what_a_spec_refuses_is_refused_when_the_settings_load(
    section: str, values: dict[str, object], why: str
) -> None:
    """The checks live in the spec classes, so a bad value fails at load, not in a cycle."""
    from aftertune.daemon.errors import SettingsError

    with pytest.raises(SettingsError, match=rf"invalid setting {section}.*{why}") as info:
        load_settings(overrides={section: values})
    assert "\n" not in str(info.value) and "ArgsKwargs" not in str(info.value)


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


def test_an_unset_prompt_is_the_model_kinds_and_a_configured_half_still_wins() -> None:
    from aftertune.store.prompt import DEFAULT_PROMPT

    assert specs_from(load_settings()).train.template == DEFAULT_PROMPT  # generative base
    ranking = {"model": {"base": "embedded:minilm"}}
    specs = specs_from(load_settings(overrides=ranking))
    segmented = PromptTemplate("{input} [SEP] {instruction}", "{instruction}")
    assert specs.train.template == specs.eval.template == segmented
    assert specs.export is not None and specs.export.template == segmented
    custom = {**ranking, "prompt": {"with_input": "Q: {instruction} [{input}]"}}
    mixed = specs_from(load_settings(overrides=custom)).train.template
    assert mixed == PromptTemplate("Q: {instruction} [{input}]", "{instruction}")
    from aftertune.daemon.errors import SettingsError

    wrong = "invalid setting prompt: prompt template 'with_input' must contain '{input}'"
    with pytest.raises(SettingsError, match=re.escape(wrong)):
        load_settings(overrides={**ranking, "prompt": {"with_input": "{instruction} only"}})


def test_a_ranking_base_without_a_separator_keeps_the_generic_layout(tmp_path: Path) -> None:
    import json

    from aftertune.learners.kinds.ranking.kind import separator

    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (roberta / "special_tokens_map.json").write_text(json.dumps({"sep_token": {"content": "</s>"}}))
    assert separator(roberta) == "</s>"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer_config.json").write_text("not json")
    assert separator(bare) is None


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
    assert specs["replay"] == DEFAULTS.replay and specs["ewc"] == DEFAULTS.ewc
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
    from aftertune.learners.evaluate import held_out
    from aftertune.learners.window import Watermarks, suites
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
        by_suite = suites(store, Watermarks(), store.max_seq(), 3)
    assert {t: len(v) for t, v in evaluated.items()} == {"a": 3, "b": 3}
    assert by_suite["gain"] == evaluated and by_suite["regression"] == {}


def test_unset_lr_and_epochs_follow_the_model_kind() -> None:
    ranking = specs_from(Settings(model={"base": "embedded:minilm"}))
    assert (ranking.train.lr, ranking.train.epochs) == (1e-3, 2)
    chosen = specs_from(Settings(model={"base": "embedded:minilm"}, train={"lr": 0.1, "epochs": 4}))
    assert (chosen.train.lr, chosen.train.epochs) == (0.1, 4)
