"""What a bundle format's runtime gives the ``Bundle`` (``bundle.py``), and what they share.

Each format has its own runtime, built from the bundle's directory and manifest:
``genai.py`` (onnxruntime-genai), ``logits.py`` (plain ONNX Runtime, logits),
``ranking.py`` (an ONNX encoder and each task's candidate answers). ``bundle.py`` maps a
format to its runtime and looks it up once, at open; nothing else asks which format it has.

Every runtime encodes text and answers rendered prompts (``Runtime``). What only some
formats can do has its own protocol: generating text (``Generator``), next-token logits
(``LogitsModel``), embeddings (``Embedder``); the ``Bundle`` says so when asked for what its
runtime lacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aftertune.store.errors import BundleError

# (task, rendered prompt): a generative runtime ignores the task, a ranking one needs it.
Prompt = tuple[str | None, str]
# An answer generated for ``Runtime.answer`` is at most this many tokens.
ANSWER_TOKENS = 32
# A token covers at most this many characters (tokenizers' longest pieces are shorter), so a
# text cut to limit * CHARS_PER_TOKEN characters before tokenizing keeps every token the
# limit would: a 20 MB input costs a cut, not gigabytes of token ids.
CHARS_PER_TOKEN = 16


class Runtime(Protocol):
    """A loaded bundle of one format, answering prompts."""

    @property
    def candidates(self) -> Mapping[str, list[str]]:
        """Each task's known answers (ranking formats); empty for a format that generates."""
        ...

    def encode(self, text: str) -> list[int]:
        """The text's ids, special tokens included exactly as training added them."""
        ...

    def answer(self, prompts: Sequence[Prompt], batch_size: int) -> list[str]:
        """One answer per (task, prompt), in order."""
        ...


class Decoder(Protocol):
    """What greedy text generation needs (``generate_text``)."""

    context_length: int  # tokens the model sees, prompt and answer; 0: unknown

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids``: new tokens, up to (not including) EOS."""
        ...


@runtime_checkable
class Generator(Runtime, Decoder, Protocol):
    """A runtime that continues a prompt token by token (greedy)."""


@runtime_checkable
class LogitsModel(Protocol):
    def logits(self, prompt_ids: list[int]) -> Any:
        """Next-token logits at every position, numpy [seq, vocab]."""
        ...


@runtime_checkable
class Embedder(Runtime, Protocol):
    """A runtime that embeds texts and picks the nearest candidate."""

    max_length: int  # tokens an input is cut to
    pad_token_id: int

    def embed(self, texts: Sequence[str], batch_size: int) -> Any:
        """Normalised embeddings, numpy [len(texts), width], in order."""
        ...

    def pick(self, task: str, vector: Any) -> str:
        """The candidate of ``task`` nearest ``vector``."""
        ...


def require_prompt(prompt_ids: list[int]) -> None:
    if not prompt_ids:
        raise BundleError("the prompt is empty")


def generate_text(model: Decoder, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer to ``prompt``, never ending inside a character the budget cut.

    A prompt the model's context cannot hold with the answer is refused, measured in
    characters before it is tokenized (a 20 MB prompt is never turned into ids), then in
    tokens."""
    context = model.context_length
    if context and len(prompt) > context * CHARS_PER_TOKEN:
        raise BundleError(
            f"the prompt is {len(prompt)} characters, far past the {context} tokens the model "
            "sees: shorten the instruction or input"
        )
    prompt_ids = model.encode(prompt)
    if context and len(prompt_ids) + max_new_tokens > context:
        raise BundleError(
            f"the prompt is {len(prompt_ids)} tokens; with {max_new_tokens} for the answer "
            f"that is past the {context} tokens the model sees: shorten the instruction or input"
        )
    ids = model.generate_ids(prompt_ids, max_new_tokens)
    if len(ids) == max_new_tokens:  # cut by the budget, maybe inside a character
        ids = _whole_characters(model, ids)
    return model.decode(ids)


def _whole_characters(model: Decoder, ids: list[int]) -> list[int]:
    """``ids`` without the trailing tokens of a character the budget cut off.

    A byte-level model spends 3 tokens on a CJK character; cut after one or two, the answer
    would end in U+FFFD. A UTF-8 character is at most 4 bytes, so at most 3 tokens go."""
    for drop in range(min(4, len(ids))):
        if not model.decode(ids[: len(ids) - drop]).endswith("\ufffd"):
            return ids[: len(ids) - drop]
    return ids


def stop_ids(manifest: Mapping[str, Any]) -> frozenset[int]:
    """The manifest's ``eos_token_id``: one id, or several (some Hugging Face configs)."""
    value = manifest.get("eos_token_id")
    if value is None:
        return frozenset()
    return frozenset(value) if isinstance(value, list) else frozenset([value])


def onnx_session(model: Path) -> Any:
    """An ONNX Runtime CPU session on ``model``, logging warnings and worse only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No spinning: ONNX Runtime's idle pool threads otherwise spin for work and take the
    # cores from the calls of other requests (and from whatever else runs on the host). With
    # 4 callers on a shared 2-core host, MiniLM answered 25.4 records/s spinning, 46.2 without
    # (docs/benchmarks.md, "Answer server vs raw ONNX Runtime"). An idle, dedicated host may
    # answer a lone call slightly later; not measured here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
