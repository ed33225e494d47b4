"""Shared helpers for the learner tests: a tiny random Llama with a byte-level tokenizer.

A random base is enough for the properties tested here (masking, resume parity, EWC algebra,
merging); the embedded pretrained base is used where learning quality matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens (ids 3..258) after three specials; any UTF-8 text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(seed: int = 0, vocab_size: int = 259) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_base(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama + byte tokenizer saved as a local HF directory (a valid base spec)."""
    tiny_llama(seed).save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


@dataclass(frozen=True)
class Ex:
    """Stands in for the store's Example: the learner only needs these fields."""

    task: str
    instruction: str
    input: str
    output: str
    weight: float = 1.0


def copy_task(n: int, task: str = "copy", seed: int = 0) -> list[Ex]:
    """Answer = the first letter of the input: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefgh"
    out = []
    for _ in range(n):
        word = "".join(letters[int(i)] for i in torch.randint(0, len(letters), (4,), generator=g))
        out.append(Ex(task=task, instruction="first letter", input=word, output=word[0]))
    return out


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: for models this small, threads only fight over the shared cores.

    Import it into a test module to apply it there (autouse fixtures follow their module).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
