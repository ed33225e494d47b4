"""The LoRA recipe end to end on a tiny real Llama with real peft: learning, resume, hygiene."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from learner_fixtures import byte_tokenizer, copy_task, single_thread, state_copy, tiny_llama  # noqa: F401 (autouse)
from peft import PeftModel
from safetensors.torch import load_file
from spec_fixtures import DEFAULTS, ewc_spec, lora_spec, replay_spec, train_spec

from aftertune.learners.base_model import EMBEDDED_TINY, load_base
from aftertune.learners.data import collate, encode_examples, response_loss
from aftertune.learners.errors import LearnerError, NonFiniteLoss, TrainingInterrupted
from aftertune.learners.ewc import ewc_penalty, load_fisher
from aftertune.learners.kinds.generative.objective import ResponseObjective
from aftertune.learners.recipe import TrainJob, lr_schedule, train_adapter
from aftertune.learners.training_specs import TrainSpec

NEW = copy_task(24, task="copy", seed=0)
OLD = copy_task(24, task="old", seed=1)
LORA = lora_spec(r=4, dropout=0.1)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def spec(**kw) -> TrainSpec:
    base = {
        "lr": 5e-3,
        "warmup_steps": 2,
        "batch_size": 4,
        "max_steps": 12,
        "progress": False,
        "checkpoint_every": 0,
    }
    return train_spec(**{**base, **kw})


def run(model, tok, tmp: Path, name: str, should_stop=None, **kw) -> object:
    args = {
        "train": spec(),
        "lora": LORA,
        "replay": replay_spec(ratio=1.0),
        "ewc": ewc_spec(lam=5.0, fisher_samples=8),
        "fisher_path": tmp / f"{name}-fisher.safetensors",
        "out_dir": tmp / name,
    }
    job = TrainJob.of(NEW, OLD, **{**args, **kw})
    return train_adapter(model, tok, job, objective=ResponseObjective(tok), should_stop=should_stop)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def data_loss(model, tok, examples) -> float:
    encoded, _ = encode_examples(tok, examples, max_length=64)
    batch = collate(encoded, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return response_loss(logits, batch["labels"]).item()


def test_resumed_training_reaches_the_same_adapter(tok, tmp_path) -> None:
    """20 steps straight == 10 steps, crash, resume to 20 (grad accum, dropout, replay, EWC)."""
    train = spec(max_steps=20, grad_accum=2, checkpoint_every=5)
    straight = run(tiny_llama(), tok, tmp_path, "straight", train=train)

    def crash(step: int, _total: int) -> bool:
        if step == 12:  # after the step-10 checkpoint: steps 11-12 are lost and redone
            raise RuntimeError("simulated crash")
        return False

    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(
            tiny_llama(),
            tok,
            tmp_path,
            "resumed",
            train=train,
            checkpoint_dir=ckpt,
            should_stop=crash,
        )
    assert [p.name for p in ckpt.iterdir()] == ["step-00000010"]
    assert not (tmp_path / "resumed").exists()

    resumed = run(tiny_llama(), tok, tmp_path, "resumed", train=train, checkpoint_dir=ckpt)
    assert resumed.resumed_from_step == 10 and resumed.steps == straight.steps == 20
    a, b = adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert resumed.loss_first == straight.loss_first and resumed.loss_last == straight.loss_last
    assert list(ckpt.iterdir()) == []  # a finished cycle leaves nothing to resume


def test_warm_stop_checkpoints_and_raises(tok, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted) as info:
        run(tiny_llama(), tok, tmp_path, "a", checkpoint_dir=ckpt, should_stop=lambda s, _: s == 3)
    assert info.value.step == 3 and (ckpt / "step-00000003" / "state.json").is_file()
    state = json.loads((ckpt / "step-00000003" / "state.json").read_text())
    assert state["state"]["step"] == 3
    assert {p.name for p in (ckpt / "step-00000003").iterdir()} == {
        "adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
    }  # fmt: skip


def test_checkpoint_of_another_run_is_not_resumed(tok, tmp_path, caplog) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted):
        run(tiny_llama(), tok, tmp_path, "a", checkpoint_dir=ckpt, should_stop=lambda s, _: s == 3)
    with caplog.at_level(logging.WARNING, logger="aftertune.learners.recipe"):
        result = run(tiny_llama(), tok, tmp_path, "b", train=spec(seed=1), checkpoint_dir=ckpt)
    assert result.resumed_from_step == 0 and result.steps == 12
    assert any("another run" in r.getMessage() for r in caplog.records)


def test_training_lowers_the_loss_and_leaves_the_base_untouched(tmp_path) -> None:
    # LoRA on a random base learns next to nothing (DESIGN.md): learning needs the pretrained one.
    model, tok = load_base(EMBEDDED_TINY)
    before = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loss_before = data_loss(model, tok, NEW)
    seen: list[tuple[int, int]] = []  # (step, total) as the daemon's progress sees them
    result = run(
        model, tok, tmp_path, "learn",
        train=spec(lr=1e-2, max_steps=None, epochs=10, batch_size=8),
        lora=lora_spec(r=8), replay=replay_spec(enabled=False), ewc=None,
        should_stop=lambda step, total: bool(seen.append((step, total))),
    )  # fmt: skip
    assert result.steps == 30 and result.new_examples == 24 and result.replay_examples == 0
    assert seen == [(step, 30) for step in range(1, 31)]  # epochs mode knows its total
    assert result.loss_last < 0.6 * result.loss_first
    assert result.tokens_per_s > 0 and result.train_seconds > 0 and result.fisher_seconds == 0
    # The base model comes back exactly as it was: same weights, flags, no LoRA modules.
    after = state_copy(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("lora" in n for n, _ in model.named_modules())
    # The saved adapter is a valid PEFT adapter and carries what was learned.
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    # all-linear (the default): every projection of both layers, not the output layer.
    llama = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert DEFAULTS.lora.target_modules == ("all-linear",)
    assert result.adapted_modules == dict.fromkeys(sorted(llama), model.config.num_hidden_layers)
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == llama
    tuned = PeftModel.from_pretrained(model, str(result.adapter_dir))
    assert data_loss(tuned, tok, NEW) < 0.6 * loss_before


def test_same_seed_same_adapter_and_caller_rng_untouched(tok, tmp_path) -> None:
    models = tiny_llama(), tiny_llama()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = run(models[0], tok, tmp_path, "a", train=spec(max_steps=4))
    assert torch.equal(torch.rand(1), expected_next)
    b = run(models[1], tok, tmp_path, "b", train=spec(max_steps=4))
    ta, tb = adapter_tensors(a.adapter_dir), adapter_tensors(b.adapter_dir)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_ewc_holds_the_adapter_closer_to_the_champion(tok, tmp_path) -> None:
    free = run(tiny_llama(), tok, tmp_path, "free", train=spec(max_steps=10), ewc=ewc_spec(lam=0.0))
    held = run(tiny_llama(), tok, tmp_path, "held", train=spec(max_steps=10), ewc=ewc_spec(lam=1e4))
    assert free.ewc_penalty_last == 0.0 and held.ewc_penalty_last > 0 and held.fisher_seconds > 0
    fisher = load_fisher(tmp_path / "held-fisher.safetensors")

    def fisher_weighted_change(adapter_dir: Path) -> float:
        """Σ F ⊙ ΔW²: how far the adapter moves the weights that mattered to the old task."""
        return ewc_penalty(
            PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)), fisher, 2.0
        ).item()

    assert fisher_weighted_change(held.adapter_dir) < 0.5 * fisher_weighted_change(free.adapter_dir)


def test_truncation_is_reported(tok, tmp_path) -> None:
    result = run(tiny_llama(), tok, tmp_path, "t", train=spec(max_steps=1, max_length=30))
    assert result.truncated == len(NEW) + len(OLD)  # every prompt is longer than 15 bytes


def test_bad_input_raises() -> None:
    with pytest.raises(LearnerError, match="at least one new example"):
        job = TrainJob.of(
            [], OLD, train=spec(), lora=LORA, replay=replay_spec(), ewc=None, out_dir=Path("unused")
        )
        tok = byte_tokenizer()
        train_adapter(tiny_llama(), tok, job, objective=ResponseObjective(tok))
    for bad in (
        {"r": 0},
        {"alpha": 0},
        {"dropout": 1.0},
        {"target_modules": ()},
        {"target_modules": "q_proj"},
    ):
        with pytest.raises(ValueError):
            lora_spec(**bad)
    assert lora_spec(r=8).alpha == 16 and lora_spec(target_modules=["q_proj"]).target_modules == (
        "q_proj",
    )
    for bad in (
        {"lr": 0},
        {"batch_size": 0},
        {"max_steps": 0},
        {"schedule": "step"},
        {"device": "tpu"},
    ):
        with pytest.raises(ValueError):
            train_spec(**bad)


def lr_factors(schedule: str, *, warmup: int, total: int) -> list[float]:
    """The multiplier of the peak lr at steps 0..total, read from a real optimizer."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(optimizer, warmup=warmup, total=total, schedule=schedule)
    out = []
    for _ in range(total + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return out


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    f = lr_factors("cosine", warmup=4, total=20)
    # transformers' warmup starts at 0: step s of the warmup runs at s / warmup of the peak.
    assert f[0] < f[1] < f[2] < f[3] < f[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(f[4:])) and f[20] == pytest.approx(0)
    assert f[12] == pytest.approx(0.5)  # cosine's midpoint
    assert lr_factors("linear", warmup=4, total=20)[12] == pytest.approx(0.5)


def test_a_non_finite_loss_stops_training_naming_the_step_and_the_weights(tok, tmp_path) -> None:
    """1e308 is finite in float64 and inf in float32: the loss turns NaN at the first step."""
    heavy = [*NEW[:3], dataclasses.replace(NEW[3], weight=1e308), *NEW[4:]]
    with pytest.raises(NonFiniteLoss) as info:
        job = TrainJob.of(
            heavy,
            OLD,
            train=spec(batch_size=24),
            lora=LORA,
            replay=replay_spec(ratio=0.0),
            ewc=None,
            out_dir=tmp_path / "a",
        )
        train_adapter(tiny_llama(), tok, job, objective=ResponseObjective(tok))
    message = str(info.value)
    assert isinstance(info.value, LearnerError)
    assert "training loss is nan at step 1" in message
    assert "weights 1 to 1e+308" in message and "no record was quarantined" in message
    assert not (tmp_path / "a").exists()  # no adapter
