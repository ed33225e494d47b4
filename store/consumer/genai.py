"""The ``onnxruntime-genai`` runtime: greedy decoding with a KV cache (no torch).

The bundle is a genai model directory (``genai_config.json``, ``model.onnx`` with its KV
cache) that onnxruntime-genai loads with its own tokenizer.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aftertune.store.consumer.runtime import (
    ANSWER_TOKENS,
    Prompt,
    generate_text,
    require_prompt,
    stop_ids,
)


class GenaiRuntime:
    """An ``onnxruntime-genai`` bundle, answering by greedy decoding."""

    candidates: Mapping[str, list[str]] = MappingProxyType({})  # it generates; no candidates
    # onnxruntime-genai keeps the GIL while it runs (measured: two generators on two threads
    # decode no faster than one; docs/benchmarks.md), so a thread of its own buys a caller
    # nothing but the hand-off.
    holds_gil = True

    def __init__(self, path: Path, manifest: Mapping[str, Any]) -> None:
        import onnxruntime_genai as og

        self.model = og.Model(str(path))
        self.tokenizer = og.Tokenizer(self.model)
        self.stop = stop_ids(manifest)
        # The window a reused generator is sized for; 0: unknown, one generator per call.
        self.context_length = int(manifest.get("context_length") or 0)
        # One generator, rewound for each call: building one cost ~13 ms a call on the
        # development CPU, 10x a short answer's whole decode.
        self._generator: Any = None
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids)) if ids else ""

    def answer(self, prompts: Sequence[Prompt], batch_size: int) -> list[str]:
        return [generate_text(self, prompt, ANSWER_TOKENS) for _, prompt in prompts]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        require_prompt(prompt_ids)
        import onnxruntime_genai as og

        with self._lock:
            if not self.context_length:  # no known window: a generator sized for this call
                params = og.GeneratorParams(self.model)
                params.set_search_options(
                    max_length=len(prompt_ids) + max_new_tokens, do_sample=False
                )
                return self._decode(og.Generator(self.model, params), prompt_ids, max_new_tokens)
            if self._generator is None:
                params = og.GeneratorParams(self.model)
                params.set_search_options(max_length=self.context_length, do_sample=False)
                self._generator = og.Generator(self.model, params)
            else:
                self._generator.rewind_to(0)
            try:
                return self._decode(self._generator, prompt_ids, max_new_tokens)
            except Exception:
                self._generator = None  # e.g. a prompt past the window: start clean next time
                raise

    def _decode(self, generator: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        generator.append_tokens(prompt_ids)
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.stop:
                break
            out.append(token)
        return out
