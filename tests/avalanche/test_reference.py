"""avalanche-lib as a reference oracle: our EWC and forgetting metrics against its code.

These run only in ``.venv-avalanche`` (``make test-avalanche``; ``make test`` runs it too):
avalanche needs torchvision, a ~6 GB install that never goes into the main venv. There the
module is skipped, unless ``AFTERTUNE_REQUIRE_AVALANCHE=1`` (set by the Makefile target)
turns a missing avalanche into an error, so CI cannot pass on a silent skip.

Everything avalanche sees is real: its ``EWCPlugin`` hooks and its forgetting/BWT plugin
metrics, driven with the calls its training and evaluation loops make. The strategy they
get is a plain namespace with only the attributes those hooks read: a full avalanche
strategy needs avalanche benchmarks and cannot train a Hugging Face causal LM as is.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from learner_fixtures import Ex, copy_task
from spec_fixtures import DEFAULTS, lora_spec
from torch import nn

with warnings.catch_warnings():
    # avalanche imports qpsolvers (for GEM), which warns that no QP solver is installed;
    # nothing here solves a QP.
    warnings.simplefilter("ignore", UserWarning)
    # A submodule, not bare "avalanche": with tests/ on sys.path (pytest puts it there for
    # the root conftest), this very folder imports as an empty namespace package "avalanche".
    if os.environ.get("AFTERTUNE_REQUIRE_AVALANCHE"):
        import avalanche.training.plugins  # noqa: F401 - fail loudly: this run exists for it
    else:
        pytest.importorskip(
            "avalanche.training.plugins",
            reason="avalanche-lib is not installed here; these checks run in .venv-avalanche"
            " (make test-avalanche)",
        )
    from avalanche.evaluation.metrics.accuracy import StreamAccuracy
    from avalanche.evaluation.metrics.forgetting_bwt import (
        ExperienceBWT,
        ExperienceForgetting,
        StreamBWT,
        StreamForgetting,
    )
    from avalanche.training.plugins import EWCPlugin

from aftertune.learners.base_model import load_base
from aftertune.learners.data import Encoded, collate, encode_examples, pad_id, response_loss
from aftertune.learners.ewc import ewc_penalty, target_weights, update_online_fisher
from aftertune.learners.forgetting import continual_metrics
from aftertune.learners.kinds.generative.fisher import estimate_fisher
from aftertune.learners.lora import LoraSpec, attach_fresh_adapter

pytestmark = pytest.mark.avalanche

TARGETS = DEFAULTS.lora.target_modules
MAX_LENGTH = 64
PREFIX = "lm."  # the wrapper's attribute name: avalanche's parameter names carry it


class LogitsOnly(nn.Module):
    """The causal LM as avalanche calls a model: ``model(x)`` returns the output the criterion
    takes. ``x`` stacks input ids and attention mask, ``[batch, 2, length]``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def response_criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Our training loss behind avalanche's ``criterion(out, y)``: ``y`` carries the labels
    and, in its last column, each example's weight (float holds ids < 2**24 exactly)."""
    return response_loss(logits, y[:, :-1].long(), y[:, -1])


class EncodedDataset(torch.utils.data.Dataset):
    """Our encoded examples as avalanche reads a dataset: its own ``collate_fn`` giving
    ``(x, y, task_labels)`` minibatches, padded exactly as ``estimate_fisher`` pads them."""

    def __init__(self, encoded: Sequence[Encoded], pad_token_id: int) -> None:
        self.encoded = list(encoded)
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> Encoded:
        return self.encoded[i]

    def collate_fn(self, chunk: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = collate(chunk, self.pad_token_id)
        x = torch.stack([b["input_ids"], b["attention_mask"]], dim=1)
        y = torch.cat([b["labels"].float(), b["weights"][:, None]], dim=1)
        return x, y, torch.zeros(len(chunk), dtype=torch.long)


def weighted(examples: list[Ex]) -> list[Ex]:
    """Unequal example weights, so the weighted loss is compared too, not only the mean."""
    return [replace(e, weight=(0.5, 1.0, 2.0)[i % 3]) for i, e in enumerate(examples)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the model is tiny, and on a busy 2-core machine two spinning
    OpenMP threads made each Fisher estimate ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(one_thread: None) -> tuple[nn.Module, Any]:
    return load_base("embedded:tiny")


def avalanche_train_exp(
    plugin: EWCPlugin, model: nn.Module, tok: Any, examples: list[Ex], exp: int, batch_size: int
) -> None:
    """What avalanche does at the end of training experience ``exp``: importances of the
    model on that experience's data, and a copy of its parameters as θ*."""
    encoded, _ = encode_examples(tok, examples, max_length=MAX_LENGTH)
    strategy = SimpleNamespace(
        clock=SimpleNamespace(train_exp_counter=exp),
        model=LogitsOnly(model),
        _criterion=response_criterion,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),  # only its zero_grad is used
        experience=SimpleNamespace(dataset=EncodedDataset(encoded, pad_id(tok))),
        device="cpu",
        train_mb_size=batch_size,
    )
    plugin.after_training_exp(strategy, num_workers=0)
    # avalanche leaves the last minibatch's gradients behind and the model in train mode.
    for p in model.parameters():
        p.grad = None
    model.eval()


def avalanche_penalty(plugin: EWCPlugin, model: nn.Module, exp: int) -> torch.Tensor:
    """The term avalanche's ``before_backward`` adds to the loss while training ``exp``."""
    strategy = SimpleNamespace(
        clock=SimpleNamespace(train_exp_counter=exp),
        model=LogitsOnly(model),
        device="cpu",
        loss=torch.zeros(()),
    )
    plugin.before_backward(strategy)
    return strategy.loss


def adapter_with_delta(model: nn.Module, spec: LoraSpec, seed: int) -> nn.Module:
    """A peft-wrapped copy of ``model`` whose adapter has a non-zero ΔW, as after training
    (a fresh one has B = 0)."""
    torch.manual_seed(seed)
    adapted = attach_fresh_adapter(copy.deepcopy(model), spec)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return adapted


def importances_of_targets(plugin: EWCPlugin, exp: int, keys: Sequence[str]) -> dict[str, Any]:
    return {k: plugin.importances[exp][PREFIX + k].data for k in keys}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_fisher_equals_avalanche_importances_on_the_targeted_weights(
    base: tuple[nn.Module, Any], batch_size: int
) -> None:
    model, tok = base
    # 5 examples: with batch_size 2 the last minibatch is short, and both sides must still
    # divide by the number of minibatches (3), not of examples.
    examples = weighted(copy_task(5, seed=1))
    ours = estimate_fisher(
        model, tok, examples, TARGETS, batch_size=batch_size, max_length=MAX_LENGTH
    )
    plugin = EWCPlugin(ewc_lambda=1.0)
    avalanche_train_exp(plugin, model, tok, examples, exp=0, batch_size=batch_size)
    theirs = importances_of_targets(plugin, 0, list(ours))

    layers = model.config.num_hidden_layers
    assert set(ours) == set(target_weights(model, TARGETS)) and len(ours) == layers * 7
    for key, f in ours.items():
        assert f.abs().sum() > 0, f"{key}: a zero Fisher would make this comparison vacuous"
        torch.testing.assert_close(f, theirs[key], rtol=1e-5, atol=1e-12, msg=key)


def test_penalty_equals_avalanche_for_the_adapter_delta(base: tuple[nn.Module, Any]) -> None:
    """θ − θ* = ΔW: avalanche's penalty on the merged model equals ours on the adapter."""
    model, tok = base
    examples = copy_task(4, seed=2)
    fisher = estimate_fisher(model, tok, examples, TARGETS, batch_size=2, max_length=MAX_LENGTH)
    ewc_lambda = 0.7
    plugin = EWCPlugin(ewc_lambda=ewc_lambda)
    avalanche_train_exp(plugin, model, tok, examples, exp=0, batch_size=2)  # θ* = champion

    adapted = adapter_with_delta(model, lora_spec(r=4, alpha=12), seed=3)
    # Our λ is twice avalanche's ewc_lambda: we write the penalty λ/2·ΣF·Δ², it λ·ΣF·Δ².
    ours = ewc_penalty(adapted, fisher, lam=2 * ewc_lambda)
    # peft's own merge builds θ = W + ΔW independently of our ΔW arithmetic.
    merged = copy.deepcopy(adapted).merge_and_unload()
    theirs = avalanche_penalty(plugin, merged, exp=1)

    assert ours.item() > 1e-6
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0.0)


def test_online_fisher_equals_avalanche_online_importances(
    base: tuple[nn.Module, Any], tmp_path: Path
) -> None:
    """Two champions in a row: decay·F_old + F_new on both sides (avalanche mode="online")."""
    model, tok = base
    decay = 0.8
    task_a, task_b = copy_task(3, task="a", seed=4), copy_task(3, task="b", seed=5)
    # The champion after one promoted cycle. peft froze its weights; avalanche's model is
    # one it has just trained, with gradients on.
    second = adapter_with_delta(model, lora_spec(r=4), seed=6).merge_and_unload()
    second.requires_grad_(True)

    path = tmp_path / "fisher.safetensors"
    f_a = estimate_fisher(model, tok, task_a, TARGETS, batch_size=1, max_length=MAX_LENGTH)
    update_online_fisher(path, f_a, decay, champion="first")
    f_b = estimate_fisher(second, tok, task_b, TARGETS, batch_size=1, max_length=MAX_LENGTH)
    ours = update_online_fisher(path, f_b, decay, champion="second")

    plugin = EWCPlugin(ewc_lambda=1.0, mode="online", decay_factor=decay)
    avalanche_train_exp(plugin, model, tok, task_a, exp=0, batch_size=1)
    avalanche_train_exp(plugin, second, tok, task_b, exp=1, batch_size=1)
    theirs = importances_of_targets(plugin, 1, list(ours))
    for key, f in ours.items():
        torch.testing.assert_close(f, theirs[key], rtol=1e-5, atol=1e-12, msg=key)


# Scores in eighths: eight eval samples per task give them exactly as accuracies. Row i is
# after training task i. The upper triangle (tasks not trained yet) must be ignored, task 2
# ends higher than after its own step (negative forgetting), and the last task cannot be
# forgotten.
MATRIX = [
    [6 / 8, 1 / 8, 2 / 8, 0 / 8],
    [5 / 8, 7 / 8, 1 / 8, 3 / 8],
    [4 / 8, 6 / 8, 4 / 8, 2 / 8],
    [3 / 8, 5 / 8, 5 / 8, 8 / 8],
]
EVAL_SAMPLES = 8


def avalanche_metrics(matrix: list[list[float]]) -> dict[str, Any]:
    """Replay avalanche's train/eval loop through its metric hooks and return what it reports
    after the final evaluation. The model's predictions are made up to score ``matrix``."""
    metrics = {
        "exp_forgetting": ExperienceForgetting(),
        "stream_forgetting": StreamForgetting(),
        "exp_bwt": ExperienceBWT(),
        "stream_bwt": StreamBWT(),
        "stream_acc": StreamAccuracy(),
    }
    tasks = len(matrix)
    strategy = SimpleNamespace(is_eval=False, clock=SimpleNamespace(train_iterations=0))

    def experience(k: int) -> SimpleNamespace:
        return SimpleNamespace(
            current_experience=k, task_labels=[0], origin_stream=SimpleNamespace(name="test")
        )

    for i in range(tasks):
        strategy.is_eval, strategy.experience = False, experience(i)
        for m in metrics.values():
            m.before_training_exp(strategy)
        strategy.clock.train_iterations += 10
        strategy.is_eval = True
        for m in metrics.values():
            m.before_eval(strategy)
        for j in range(tasks):
            correct = round(matrix[i][j] * EVAL_SAMPLES)
            strategy.experience = experience(j)
            strategy.mb_y = torch.ones(EVAL_SAMPLES, dtype=torch.long)
            strategy.mb_output = (torch.arange(EVAL_SAMPLES) < correct).long()  # labels
            for m in metrics.values():
                m.before_eval_exp(strategy)
                m.before_eval_iteration(strategy)
                m.after_eval_iteration(strategy)
                m.after_eval_exp(strategy)
        for m in metrics.values():
            m.after_eval(strategy)
    return {name: m.result() for name, m in metrics.items()}


def test_forgetting_and_bwt_equal_avalanche_definitions() -> None:
    ours = continual_metrics(MATRIX)
    theirs = avalanche_metrics(MATRIX)

    assert theirs["exp_forgetting"] == {j: f for j, f in enumerate(ours.forgetting)}
    assert theirs["exp_bwt"] == {j: -f for j, f in enumerate(ours.forgetting)}
    assert theirs["stream_forgetting"] == pytest.approx(ours.mean_forgetting, abs=1e-12)
    assert theirs["stream_bwt"] == pytest.approx(ours.bwt, abs=1e-12)
    assert ours.bwt == pytest.approx(-(3 / 8 + 2 / 8 - 1 / 8) / 3)  # not a vacuous zero
    # avalanche's stream accuracy pools all eval samples; with equal-sized held-out sets
    # that is our AA, the plain mean of the last row.
    assert theirs["stream_acc"] == pytest.approx(ours.aa, abs=1e-12)


def test_single_task_has_no_forgetting_on_either_side() -> None:
    ours = continual_metrics([[0.5]])
    theirs = avalanche_metrics([[0.5]])
    assert theirs["exp_forgetting"] == {} and ours.forgetting == ()
    assert theirs["stream_bwt"] == ours.bwt == 0.0
