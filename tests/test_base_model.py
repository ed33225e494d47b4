"""The embedded base model: tokenizer round-trips, loading, generation, and that it learned."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from aftertune.learners import curriculum
from aftertune.learners.base_model import (
    EMBEDDED_TINY,
    GENERATIVE,
    base_sha256,
    load_base,
    model_kind,
    resolve_base,
)
from aftertune.learners.errors import BaseModelError, LearnerError
from aftertune.learners.generate import greedy_answers
from aftertune.learners.pretrain import curriculum_accuracy, encode

TEXTS = [
    "plain ascii, with punctuation: a , b . c ? !",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\nlines\n\n  indented\r\n",
    "你好，世界！学习中文。",
    "mixed 混合 text ✓ émoji 🙂 and ß",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_base(EMBEDDED_TINY), local_files_only=True)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    return load_base(EMBEDDED_TINY)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_any_utf8(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # One token per UTF-8 byte: nothing is merged, nothing is lost or normalised.
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    # Pretraining encodes bytes directly for speed; it must agree with the shipped tokenizer.
    assert ids == encode(text)


def test_tokenizer_adds_no_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    # HF and onnxruntime-genai must tokenise prompts identically; neither adds BOS.
    assert (
        tokenizer("Input: x")["input_ids"]
        == tokenizer("Input: x", add_special_tokens=False)["input_ids"]
    )
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


def test_embedded_model_loads_with_auto_classes() -> None:
    path = resolve_base(EMBEDDED_TINY)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 512
    assert model.num_parameters() <= 1_500_000
    assert (path / "model.safetensors").stat().st_size <= 8 * 1024 * 1024


def test_load_base_defaults_to_embedded_in_eval_mode(tiny) -> None:
    model, tok = tiny
    assert not model.training
    assert tok.pad_token_id is not None
    assert model.config.pad_token_id == tok.pad_token_id


def test_greedy_generation_is_deterministic_and_stops_at_eos(tiny) -> None:
    model, tok = tiny
    prompt = curriculum.sample(random.Random(7), "first_char").prompt
    enc = tok(prompt, return_tensors="pt")
    runs = [
        model.generate(**enc, max_new_tokens=40, do_sample=False)[0, enc["input_ids"].shape[1] :]
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0][-1].item() == tok.eos_token_id
    assert len(runs[0]) <= 5  # a one-character answer, then EOS


def test_embedded_model_answers_curriculum_far_above_chance(tiny) -> None:
    model, tok = tiny
    # A held-out draw with a seed the build never used for evaluation.
    examples = curriculum.held_out(seed=12345, per_task=8)
    accuracy = curriculum_accuracy(model, tok, examples)
    mean = sum(accuracy.values()) / len(accuracy)
    # Measured 0.70 for the shipped 8000-step build (0.55 for the 1712-step one before it).
    # Chance is ~0.5 on the 11 yes/no tasks and near 0 on open answers (~0.2 overall).
    assert mean >= 0.6, accuracy
    # Simple-feature classification, the kind of task LoRA adapts it to: measured 0.975.
    features = ("has_digit", "is_upper", "short_or_long", "input_kind", "longer_than_five")
    assert sum(accuracy[t] for t in features) / len(features) >= 0.8, accuracy
    # Copying a character at a position, which LoRA tasks like last_letter build on: 1.0.
    assert (accuracy["first_char"] + accuracy["penultimate_char"]) / 2 >= 0.75, accuracy


def test_answers_are_short_and_well_formed(tiny) -> None:
    model, tok = tiny
    examples = curriculum.held_out(seed=99, per_task=2)
    answers = greedy_answers(model, tok, [e.prompt for e in examples], max_new_tokens=40)
    # The base learned to answer briefly; no answer runs into a new "Instruction:" block.
    assert all("Instruction:" not in a and len(a) < 30 for a in answers), answers


def test_resolve_base_rejects_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base(missing)
    with pytest.raises(LearnerError, match="unknown embedded"):
        resolve_base("embedded:huge")


def test_resolve_base_rejects_dir_without_model(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        resolve_base(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(BaseModelError, match="neither a causal language model"):
        resolve_base(tmp_path)


def test_local_directory_loads_and_hashes_like_embedded(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(resolve_base(EMBEDDED_TINY), copy)
    assert resolve_base(str(copy)) == copy
    model, _ = load_base(copy)
    assert model.config.model_type == "llama"
    assert base_sha256(copy) == base_sha256(EMBEDDED_TINY)


def test_base_sha256_is_stable_and_tracks_weights(tmp_path: Path) -> None:
    first = base_sha256(EMBEDDED_TINY)
    assert first == base_sha256(EMBEDDED_TINY)
    assert len(first) == 64
    copy = tmp_path / "copy"
    shutil.copytree(resolve_base(EMBEDDED_TINY), copy)
    (copy / "README.md").write_text("docs do not change the fingerprint")
    assert base_sha256(copy) == first
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert base_sha256(copy) != first


@pytest.mark.slow
def test_onnxruntime_genai_builder_converts_and_matches_torch_greedy(tiny, tmp_path: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "onnx"
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    subprocess.run(
        [
            *builder,
            "-i",
            str(resolve_base(EMBEDDED_TINY)),
            "-o",
            str(out),
            "-p",
            "fp32",
            "-e",
            "cpu",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    model, tok = tiny
    onnx_model = og.Model(str(out))
    onnx_tok = og.Tokenizer(onnx_model)
    for text in TEXTS[:5]:
        assert list(onnx_tok.encode(text)) == tok(text)["input_ids"]
    examples = [curriculum.sample(random.Random(s)) for s in range(4)]
    expected = greedy_answers(model, tok, [e.prompt for e in examples], batch_size=1)
    for example, want in zip(examples, expected, strict=True):
        params = og.GeneratorParams(onnx_model)
        params.set_search_options(max_length=512, do_sample=False)
        generator = og.Generator(onnx_model, params)
        generator.append_tokens(onnx_tok.encode(example.prompt))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < 32:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        got = onnx_tok.decode([t for t in tokens if t != tok.eos_token_id])
        assert got == want, example


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_loads_in_fp32_on_cpu(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    from family_fixtures import save_family

    path = save_family(tmp_path / "half", "qwen2", "bytebpe", dtype=dtype)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == dtype  # saved as half
    model, _ = load_base(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Asked for explicitly, a dtype is kept.
    assert load_base(path, dtype=dtype)[0].dtype == dtype


def test_gpt2_is_accepted_as_a_causal_lm_and_a_seq2seq_model_is_not(tmp_path: Path) -> None:
    from family_fixtures import save_family

    path = save_family(tmp_path / "gpt2", "gpt2", "bytebpe")
    assert "GPT2LMHeadModel" in (path / "config.json").read_text()
    assert resolve_base(path) == path
    assert model_kind(path) == GENERATIVE
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(
        '{"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}'
    )
    with pytest.raises(BaseModelError, match="neither a causal language model"):
        resolve_base(tmp_path / "t5")
    # A BERT-family checkpoint, masked-LM head or not, is a sentence encoder: the ranking kind
    # (it still needs weights).
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        '{"architectures": ["BertForMaskedLM"], "model_type": "bert"}'
    )
    with pytest.raises(BaseModelError, match="no weight files"):
        resolve_base(tmp_path / "bert")
