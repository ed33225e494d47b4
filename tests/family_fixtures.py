"""Tiny random-weight checkpoints of the Hugging Face families a user may bring as model.base.

Each is what ``save_pretrained`` writes for a real checkpoint of that family (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), at hidden size 64 and 2 layers,
beside a tokenizer trained here with the ``tokenizers`` library in one of the two styles
real checkpoints ship: byte-level BPE (GPT-2, Qwen2, Llama 3) or SentencePiece-style
Metaspace BPE with byte fallback and a BOS token (Llama 2, Mistral, Gemma). Nothing is
downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# What the tokenizers learn from: the prompt template, the tasks the tests train, and
# Chinese, so both styles meet text a real checkpoint's tokenizer would.
CORPUS = [
    "Instruction: Is the number even or odd?\nInput: 12345\nResponse: odd",
    "Instruction: What is the last digit of the number?\nInput: 9876\nResponse: 6",
    "Instruction: first letter\nInput: abcd\nResponse: a",
    "even odd yes no true false positive negative",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "一名医生在医院工作。指令微调让模型学会回答问题。你好，世界！",
] * 4
VOCAB_SIZE = 320

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3 in both styles


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2/Qwen2-style tokenizer: byte-level BPE, no BOS added to prompts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """A Llama 2/Mistral/Gemma-style tokenizer: SentencePiece BPE (▁ for spaces) with byte
    fallback, and BOS prepended to every encoded text, as those checkpoints ship."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE + 256,
        special_tokens=SPECIALS + byte_tokens,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
    )


TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "bytebpe": byte_level_bpe,
    "metaspace": metaspace_bpe,
}

_COMMON: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER: dict[str, Any] = {
    # head size 16: onnxruntime's GroupQueryAttention wants a multiple of 16.
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def _config(family: str, vocab_size: int) -> PretrainedConfig:
    common = {**_COMMON, "vocab_size": vocab_size}
    if family == "llama":
        return LlamaConfig(**_DECODER, **common)
    if family == "qwen2":
        return Qwen2Config(**_DECODER, **common)
    if family == "mistral":
        return MistralConfig(**_DECODER, **common, sliding_window=None)
    if family == "gemma":
        return GemmaConfig(**{**_DECODER, "tie_word_embeddings": True}, head_dim=16, **common)
    if family == "phi3":
        return Phi3Config(**_DECODER, **common, original_max_position_embeddings=256)
    if family == "gpt2":
        return GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, **common, tie_word_embeddings=True
        )
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")


def save_family(
    path: Path, family: str, tokenizer: str, *, dtype: torch.dtype | None = None
) -> Path:
    """A tiny random ``family`` checkpoint with a ``tokenizer``-style tokenizer, saved at ``path``."""
    tok = TOKENIZERS[tokenizer]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok)))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
