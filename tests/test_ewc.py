"""EWC: Fisher over targeted weights only, the penalty's algebra, online decay across cycles."""

from __future__ import annotations

import copy

import pytest
import torch
from learner_fixtures import Ex, byte_tokenizer, copy_task, single_thread, tiny_llama  # noqa: F401 (autouse)
from spec_fixtures import DEFAULTS, ewc_spec, lora_spec

from aftertune.learners.data import collate, encode_examples, response_loss
from aftertune.learners.errors import FisherMismatch
from aftertune.learners.ewc import (
    EwcPenalty,
    ewc_penalty,
    fisher_champion,
    load_fisher,
    update_online_fisher,
)
from aftertune.learners.kinds.generative.fisher import estimate_fisher, estimate_fisher_per_sample
from aftertune.learners.lora import attach_fresh_adapter

TARGETS = DEFAULTS.lora.target_modules


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def fisher(tok) -> dict[str, torch.Tensor]:
    return estimate_fisher(tiny_llama(), tok, copy_task(6), TARGETS, batch_size=2, max_length=64)


def test_fisher_covers_exactly_the_targeted_linear_weights(tok, fisher) -> None:
    model = tiny_llama()
    expected = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }
    # all-linear: the 7 projections of each of the 2 layers, not the output layer.
    assert TARGETS == ("all-linear",)
    assert set(fisher) == expected and len(expected) == 2 * 7
    assert not any("embed" in k or "norm" in k or "lm_head" in k for k in fisher)
    params = dict(model.named_parameters())
    for key, f in fisher.items():
        assert f.shape == params[key].shape and f.dtype == torch.float32
        assert (f >= 0).all() and f.sum() > 0
    only_q = estimate_fisher(model, tok, copy_task(2), ("q_proj",), max_length=64)
    assert set(only_q) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    }
    # The model is left as found: no grads kept, requires_grad unchanged.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_fisher_is_mean_over_minibatches_of_squared_batch_gradients(tok, fisher) -> None:
    model = tiny_llama()
    encoded, _ = encode_examples(tok, copy_task(6), max_length=64)
    key = "model.layers.1.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[key]
    expected = torch.zeros_like(weight)
    for start in (0, 2, 4):
        batch = collate(encoded[start : start + 2], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (grad,) = torch.autograd.grad(
            response_loss(logits, batch["labels"], batch["weights"]), weight
        )
        expected += grad.pow(2)
    torch.testing.assert_close(fisher[key], expected / 3, rtol=1e-5, atol=1e-10)


def test_batched_per_sample_fisher_equals_batch_size_one(tok) -> None:
    model = tiny_llama()
    examples = [*copy_task(5), Ex("t", "longer instruction", "xy" * 9, "ok")]  # mixed lengths
    one = estimate_fisher(model, tok, examples, TARGETS, batch_size=1, max_length=64)
    batched = estimate_fisher_per_sample(model, tok, examples, TARGETS, batch_size=4, max_length=64)
    assert one.keys() == batched.keys()
    for key in one:
        torch.testing.assert_close(batched[key], one[key], rtol=1e-4, atol=1e-10)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_penalty_is_zero_for_a_fresh_adapter_and_matches_brute_force(fisher) -> None:
    spec = lora_spec(r=4, alpha=12)
    torch.manual_seed(0)
    model = attach_fresh_adapter(tiny_llama(), spec)
    assert ewc_penalty(model, fisher, lam=3.0).item() == 0.0  # B starts at zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    penalty = ewc_penalty(model, fisher, lam=3.0)
    # Brute force: merge a copy and take ΔW from the weights themselves.
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    plain = tiny_llama().state_dict()
    brute = sum((fisher[k] * (merged[k] - plain[k]).pow(2)).sum() for k in fisher)
    torch.testing.assert_close(penalty, 1.5 * brute, rtol=1e-4, atol=0)
    # Its gradient reaches the adapter only.
    penalty.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_prepared_penalty_matches_the_per_layer_sum_and_follows_the_adapter(fisher) -> None:
    """EwcPenalty batches layers of one shape; value and gradients equal the plain sum."""
    from peft.tuners.lora import LoraLayer

    model = attach_fresh_adapter(tiny_llama(), lora_spec(r=4, alpha=12))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}

    def per_layer() -> torch.Tensor:
        total = torch.zeros(())
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                delta = m.lora_B["default"].weight @ m.lora_A["default"].weight
                key = name.removeprefix("base_model.model.") + ".weight"
                total = total + (fisher[key] * (delta * m.scaling["default"]).pow(2)).sum()
        return 1.5 * total

    prepared = EwcPenalty(model, fisher, lam=3.0)
    reference = per_layer()
    want = torch.autograd.grad(reference, list(lora.values()))
    value = prepared()
    got = torch.autograd.grad(value, list(lora.values()))
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-9)
    # It holds the live parameters: an update moves it (B doubled: 4x the penalty).
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:
                p.mul_(2)
    torch.testing.assert_close(prepared(), 4 * reference.detach(), rtol=1e-5, atol=0)


def test_penalty_refuses_a_fisher_for_other_targets(tok) -> None:
    only_q = estimate_fisher(tiny_llama(), tok, copy_task(2), ("q_proj",), max_length=64)
    model = attach_fresh_adapter(tiny_llama(), DEFAULTS.lora)
    with pytest.raises(FisherMismatch, match="no entry"):
        ewc_penalty(model, only_q, lam=1.0)


def test_online_fisher_decays_and_counts_a_rejected_champion_once(tmp_path) -> None:
    path = tmp_path / "fisher.safetensors"
    f1, f2, f3 = ({"w": torch.full((2, 3), v)} for v in (1.0, 10.0, 100.0))
    torch.testing.assert_close(update_online_fisher(path, f1, 0.5, champion="c1")["w"], f1["w"])
    total = update_online_fisher(path, f2, 0.5, champion="c2")
    torch.testing.assert_close(total["w"], torch.full((2, 3), 0.5 * 1 + 10))
    # The c2 cycle was rejected: the next one is on c2 again and replaces c2's contribution.
    total = update_online_fisher(path, f3, 0.5, champion="c2")
    torch.testing.assert_close(total["w"], torch.full((2, 3), 0.5 * 1 + 100))
    torch.testing.assert_close(load_fisher(path)["w"], total["w"])
    assert fisher_champion(path) == "c2"
    total = update_online_fisher(path, f1, 0.5, champion="c3")
    torch.testing.assert_close(total["w"], torch.full((2, 3), 0.5 * (0.5 * 1 + 100) + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["fisher.safetensors"]  # no temp files left
    with pytest.raises(FisherMismatch, match="base model changed"):
        update_online_fisher(path, {"w": torch.ones(4)}, 0.5, champion="c4")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="decay"):
        ewc_spec(decay=1.5)
    with pytest.raises(ValueError, match="lam"):
        ewc_spec(lam=-1)
    with pytest.raises(ValueError, match="fisher_samples"):
        ewc_spec(fisher_samples=0)


def _tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=259, n_embd=32, n_layer=1, n_head=4, n_positions=128, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_get_a_fisher_and_a_penalty_in_their_own_orientation(tok) -> None:
    # GPT-2's projections are Conv1D (weight stored (in, out)): all-linear covers them, the
    # per-sample shortcut must square gradients in that orientation, the penalty must read it.
    examples = copy_task(5, seed=3)
    one = estimate_fisher(_tiny_gpt2(), tok, examples, TARGETS, batch_size=1, max_length=64)
    fast = estimate_fisher_per_sample(_tiny_gpt2(), tok, examples, TARGETS, max_length=64)
    layers = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert set(one) == {f"transformer.h.0.{m}.weight" for m in layers}
    params = dict(_tiny_gpt2().named_parameters())
    for key, f in one.items():
        assert f.shape == params[key].shape and f.sum() > 0
        torch.testing.assert_close(fast[key], f, rtol=1e-4, atol=1e-10, msg=key)

    model = attach_fresh_adapter(_tiny_gpt2(), lora_spec(r=4, alpha=12))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    plain = _tiny_gpt2().state_dict()
    brute = sum((one[k] * (merged[k] - plain[k]).pow(2)).sum() for k in one)
    torch.testing.assert_close(ewc_penalty(model, one, lam=3.0), 1.5 * brute, rtol=1e-4, atol=0)
