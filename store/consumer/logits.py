"""The ``onnx-logits`` runtime: plain ONNX Runtime, greedy decoding without a KV cache.

``model.onnx`` maps (input_ids, attention_mask) to logits; each new token recomputes the
whole sequence, fine for short answers and quadratic for long ones. The fallback format for
architectures onnxruntime-genai's builder does not take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aftertune.store.consumer.runtime import (
    ANSWER_TOKENS,
    Prompt,
    generate_text,
    onnx_session,
    require_prompt,
    stop_ids,
)


class LogitsRuntime:
    """An ``onnx-logits`` bundle, answering by greedy decoding."""

    candidates: Mapping[str, list[str]] = MappingProxyType({})  # it generates; no candidates

    def __init__(self, path: Path, manifest: Mapping[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.session = onnx_session(path / "model.onnx")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.stop = stop_ids(manifest)
        self.context_length = int(manifest.get("context_length") or 0)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def answer(self, prompts: Sequence[Prompt], batch_size: int) -> list[str]:
        return [generate_text(self, prompt, ANSWER_TOKENS) for _, prompt in prompts]

    def logits(self, prompt_ids: list[int]) -> Any:
        import numpy as np

        ids = np.asarray([prompt_ids], dtype=np.int64)
        out = self.session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return out[0][0]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        require_prompt(prompt_ids)
        ids = list(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.logits(ids)[-1].argmax())
            if token in self.stop:
                break
            out.append(token)
            ids.append(token)
        return out
