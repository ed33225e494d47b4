"""The consumer runtime: a verified bundle answering prompts with ONNX Runtime (no torch).

``Bundle.open(DIR)`` checks every file against the manifest (``format.py``), then hands the
bundle to the runtime of its format (``RUNTIMES``): ``onnxruntime-genai`` decodes with a KV
cache, ``onnx-logits`` with plain ONNX Runtime, ``onnx-ranking`` embeds the prompt and picks
the task's nearest candidate answer. ``answer`` is the one call for every format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aftertune.store.consumer.format import (
    FORMAT_GENAI,
    FORMAT_LOGITS,
    FORMAT_RANKING,
    read_manifest,
    verify_bundle,
)
from aftertune.store.consumer.genai import GenaiRuntime
from aftertune.store.consumer.logits import LogitsRuntime
from aftertune.store.consumer.ranking import RankingRuntime
from aftertune.store.consumer.runtime import (
    ANSWER_TOKENS,
    Embedder,
    Generator,
    LogitsModel,
    Runtime,
    generate_text,
)
from aftertune.store.errors import BundleError
from aftertune.store.prompt import DEFAULT_PROMPT, PromptTemplate

# Each format's runtime, built from (bundle dir, manifest). A new format is a new module
# beside this one and a line here.
RUNTIMES: Mapping[str, Callable[[Path, Mapping[str, Any]], Runtime]] = {
    FORMAT_GENAI: GenaiRuntime,
    FORMAT_LOGITS: LogitsRuntime,
    FORMAT_RANKING: RankingRuntime,
}

R = TypeVar("R")


def _prompt_template(manifest: Mapping[str, Any], path: Path) -> PromptTemplate:
    """The manifest's prompt template; the default one (``store/prompt.py``) for what it lacks."""
    given = manifest.get("prompt") or {}
    parts = {key: given[key] for key in ("with_input", "without_input") if key in given}
    try:
        return dataclasses.replace(DEFAULT_PROMPT, **parts)
    except ValueError as exc:
        raise BundleError(f"{path}: the manifest's 'prompt': {exc}") from None


class Bundle:
    """A verified bundle, loaded and ready to answer. ``Bundle.open(DIR)`` is the entry point.

    ``answer`` / ``answer_many`` work for every format; ``generate`` (and ``decode``,
    ``generate_ids``) only for the formats that generate, ``logits`` for ``onnx-logits``,
    ``embed`` and ``pick`` for ``onnx-ranking``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.version: int = manifest["version"]
        self.format: str = manifest.get("format", "")
        self.prompt = _prompt_template(manifest, path)
        self.eos_token_id: int | list[int] | None = manifest.get("eos_token_id")
        open_runtime = RUNTIMES.get(self.format)
        if open_runtime is None:
            raise BundleError(
                f"{path}: unknown bundle format {self.format!r}; this aftertune runs "
                f"{', '.join(sorted(RUNTIMES))}"
            )
        self.runtime = open_runtime(path, manifest)

    @classmethod
    def open(cls, path: Path | str, *, verify: bool = True) -> Bundle:
        """Load the bundle at ``path`` after checking every file against its manifest."""
        path = Path(path).resolve()
        manifest = verify_bundle(path) if verify else read_manifest(path)
        return cls(path, manifest)

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt the model was trained on (the template travels in the manifest)."""
        return self.prompt.render(instruction, input)

    @property
    def candidates(self) -> Mapping[str, list[str]]:
        """Each task's known answers (a ranking bundle); empty for a generative one."""
        return self.runtime.candidates

    @property
    def context_length(self) -> int:
        """Tokens a generative model sees, prompt and answer (0: unknown or not generative)."""
        return int(getattr(self.runtime, "context_length", 0) or 0)

    @property
    def holds_gil(self) -> bool:
        """The runtime keeps Python's GIL while it answers (onnxruntime-genai): other
        threads of the process wait meanwhile, so answering on a worker thread gains no
        overlap. False for ONNX Runtime sessions, which release it."""
        return bool(getattr(self.runtime, "holds_gil", False))

    def encode(self, text: str) -> list[int]:
        """The prompt's ids, special tokens (BOS) included exactly as training added them:
        the export's parity check compares these ids with the training tokenizer's."""
        return self.runtime.encode(text)

    def answer(self, task: str | None, instruction: str, input: str = "") -> str:
        """The answer to one record: ranked among ``task``'s candidates, or generated
        (a generative bundle ignores ``task``)."""
        return self.answer_many([(task, instruction, input)])[0]

    def answer_many(
        self, records: Sequence[tuple[str | None, str, str]], batch_size: int = 32
    ) -> list[str]:
        """Answers to (task, instruction, input) records, in order; a ranking bundle embeds
        them ``batch_size`` per ONNX call, grouped by length."""
        prompts = [(task, self.render(i, x)) for task, i, x in records]
        return self.runtime.answer(prompts, batch_size)

    def generate(
        self,
        prompt: str | None = None,
        *,
        instruction: str | None = None,
        input: str = "",
        max_new_tokens: int = ANSWER_TOKENS,
    ) -> str:
        """The greedy answer to a raw ``prompt`` or to an instruction (and input)."""
        self._able(Generator, "does not generate text")
        if prompt is None:
            if not instruction:
                raise BundleError("give a prompt, or an instruction (and an input)")
            prompt = self.render(instruction, input)
        return generate_text(self, prompt, max_new_tokens)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = ANSWER_TOKENS) -> list[int]:
        """Greedy continuation of ``prompt_ids``: new tokens, up to (not including) EOS."""
        generator = self._able(Generator, "does not generate text")
        return generator.generate_ids(prompt_ids, max_new_tokens)

    def decode(self, ids: list[int]) -> str:
        return self._able(Generator, "does not generate text").decode(ids)

    def logits(self, prompt_ids: list[int]) -> Any:
        """Next-token logits at every position (onnx-logits format only), numpy [seq, vocab]."""
        return self._able(
            LogitsModel, "exposes no logits (only exposed by onnx-logits bundles)"
        ).logits(prompt_ids)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        """Normalised embeddings of ``texts`` (ranking bundles), numpy [len(texts), dim], in
        order. Runs ``batch_size`` texts per ONNX call, grouped by length (less padding)."""
        return self._able(Embedder, "exposes no embeddings").embed(texts, batch_size)

    def pick(self, task: str, vector: Any) -> str:
        """The candidate of ``task`` nearest ``vector`` (cosine: both are normalised)."""
        return self._able(Embedder, "ranks no candidates").pick(task, vector)

    @property
    def max_length(self) -> int:
        """Tokens a ranking bundle's input is cut to."""
        return self._able(Embedder, "has no encoder").max_length

    @property
    def pad_token_id(self) -> int:
        return self._able(Embedder, "has no encoder").pad_token_id

    def _able(self, capability: type[R], what: str) -> R:
        """The runtime, if it can do ``what``; else a BundleError saying so."""
        if isinstance(self.runtime, capability):
            return self.runtime
        raise BundleError(
            f"bundle v{self.version} is {self.format}, which {what}; "
            "answer(task, instruction, input) works with every bundle"
        )
