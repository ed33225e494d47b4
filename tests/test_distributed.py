"""Data-parallel training (train.processes): two gloo processes started by torchrun reach
the adapter one process trains on the same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from learner_fixtures import copy_task, save_tiny_base
from safetensors.torch import load_file
from spec_fixtures import ewc_spec, lora_spec, replay_spec, train_spec

from aftertune.daemon.specs import default_specs
from aftertune.learners.champion import load_champion
from aftertune.learners.kinds.generative.objective import ResponseObjective
from aftertune.learners.recipe import TrainJob, train_adapter
from aftertune.learners.train_job import ModelSource, train_in_processes

pytestmark = pytest.mark.slow

NEW = copy_task(24, task="copy", seed=0)
OLD = copy_task(24, task="old", seed=1)


def _args(tmp: Path, name: str) -> dict[str, object]:
    return {
        # grad_accum 4 micro-batches a step, dealt out two by two. Dropout off: each process
        # draws its own masks, so only a dropout-free step is the same computation wherever
        # a micro-batch runs.
        "train": train_spec(
            lr=5e-3,
            warmup_steps=2,
            batch_size=4,
            grad_accum=4,
            max_steps=6,
            progress=False,
            checkpoint_every=0,
            device="cpu",
        ),
        "lora": lora_spec(r=4, dropout=0.0),
        "replay": replay_spec(ratio=1.0),
        "ewc": ewc_spec(lam=5.0, fisher_samples=8),
        "fisher_path": tmp / f"{name}-fisher.safetensors",
        "out_dir": tmp / name / "adapter",
    }


def test_two_gloo_processes_under_torchrun_train_the_adapter_one_process_trains(
    tmp_path: Path,
) -> None:
    base = save_tiny_base(tmp_path / "base")
    source = ModelSource(str(base), [], tmp_path / "champions")
    model, tokenizer = load_champion(source.base, [], source.cache_dir)
    one_job = TrainJob.of(NEW, OLD, **_args(tmp_path, "one"))
    one = train_adapter(model, tokenizer, one_job, objective=ResponseObjective(tokenizer))
    two_job = TrainJob.of(NEW, OLD, **_args(tmp_path, "two"))
    specs = default_specs()
    two = train_in_processes(2, source, two_job, sets={}, specs=specs)
    assert (two.steps, two.new_examples) == (one.steps, one.new_examples) == (6, 24)
    assert two.loss_first == pytest.approx(one.loss_first, rel=1e-5)
    first = load_file(str(one.adapter_dir / "adapter_model.safetensors"))
    second = load_file(str(two.adapter_dir / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert any(t.abs().max() > 0 for k, t in first.items() if "lora_B" in k)  # it trained
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-6)


def test_a_cycle_with_two_processes_registers_a_candidate_without_loading_the_model_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.processes = 2: torchrun's ranks load the model; the daemon's process needs only
    the tokenizer (a model several GPUs hold would not fit in it as well)."""
    from dataclasses import replace

    from aftertune.daemon.settings import load_settings
    from aftertune.daemon.specs import specs_from
    from aftertune.learners import candidate
    from aftertune.learners.learning_state import LearningState
    from aftertune.store.examples import ExampleStore
    from aftertune.store.records import record_from_obj
    from aftertune.store.registry import Registry

    def no_model_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parent process loaded the model")

    monkeypatch.setattr(candidate, "load_version", no_model_here)
    specs = specs_from(load_settings(overrides={"state_dir": str(tmp_path / "state")}))
    train = replace(
        specs.train, processes=2, max_steps=3, progress=False, checkpoint_every=0, device="cpu"
    )
    specs = replace(specs, train=train)
    rows = [
        {"task": ex.task, "instruction": ex.instruction, "input": ex.input, "output": ex.output}
        for ex in NEW
    ]
    with (
        ExampleStore.in_state_dir(tmp_path / "state") as store,
        Registry(tmp_path / "state") as registry,
    ):
        store.add([record_from_obj(r) for r in rows])
        state = LearningState(store, registry, tmp_path / "state", specs)
        report = candidate.train_candidate(state)
        assert (report.candidate, report.parent, report.steps) == (1, None, 3)
        assert 0 < report.new_examples <= len(NEW)  # duplicates stored once, a test split
        assert registry.get(1).adapter_dir.is_dir()
