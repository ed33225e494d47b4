"""The consumer runtime: a verified bundle answering prompts with ONNX Runtime (no torch).

``Bundle.open(DIR)`` checks every file against the manifest (``format.py``), then loads the
model in the runtime its format names.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from aftertune.store.consumer.format import (
    FORMAT_GENAI,
    FORMAT_LOGITS,
    FORMAT_RANKING,
    read_manifest,
    verify_bundle,
)
from aftertune.store.errors import BundleError
from aftertune.store.prompt import PromptTemplate


class Bundle:
    """A verified bundle, loaded and ready to answer. ``Bundle.open(DIR)`` is the entry point.

    The ``onnxruntime-genai`` format runs through onnxruntime-genai (KV cache); the
    ``onnx-logits`` fallback through plain onnxruntime with a greedy loop that recomputes the
    whole sequence per token (fine for short answers, quadratic for long ones). An
    ``onnx-ranking`` bundle (the ranking kind) embeds the prompt with its ONNX encoder and
    answers with the task's candidate whose stored embedding is nearest. ``answer`` is the
    one call for both kinds.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.version: int = manifest["version"]
        self.format: str = manifest.get("format", "")
        prompt = manifest.get("prompt") or {}
        self.prompt = PromptTemplate(
            with_input=prompt.get("with_input", "{instruction}\n{input}\n"),
            without_input=prompt.get("without_input", "{instruction}\n"),
        )
        self.eos_token_id: int | None = manifest.get("eos_token_id")
        self._model: Any = None
        self._tokenizer: Any = None
        self._session: Any = None
        # One onnxruntime-genai generator, rewound for each call: building one cost ~13 ms
        # a call on the development CPU, 10x a short answer's whole decode.
        self._generator: Any = None
        self._generator_lock = threading.Lock()
        self.candidates: dict[str, list[str]] = {}
        self._vectors: dict[str, Any] = {}
        self.max_length = int(manifest.get("max_length") or 512)
        self.pad_token_id = int(manifest.get("pad_token_id") or 0)
        if self.format == FORMAT_GENAI:
            import onnxruntime_genai as og

            self._model = og.Model(str(path))
            self._tokenizer = og.Tokenizer(self._model)
        elif self.format == FORMAT_LOGITS:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(
                str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif self.format == FORMAT_RANKING:
            self._load_ranking(path, load_candidates="candidates" not in manifest)
        else:
            raise BundleError(f"{path}: unknown bundle format {self.format!r}")

    def _load_ranking(self, path: Path, *, load_candidates: bool) -> None:
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_length)
        if not load_candidates:  # the exporter, before candidates.json exists
            return
        try:
            tasks = json.loads((path / "candidates.json").read_text(encoding="utf-8"))["tasks"]
            matrix = np.load(path / "candidate_embeddings.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{path}: unreadable candidates: {exc}") from exc
        for task, entry in tasks.items():
            answers, start = [str(a) for a in entry["answers"]], int(entry["start"])
            self.candidates[task] = answers
            self._vectors[task] = matrix[start : start + len(answers)]
            if self._vectors[task].shape[0] != len(answers):
                raise BundleError(f"{path}: task {task!r} has fewer embeddings than answers")

    @classmethod
    def open(cls, path: Path | str, *, verify: bool = True) -> Bundle:
        """Load the bundle at ``path`` after checking every file against its manifest."""
        path = Path(path).resolve()
        manifest = verify_bundle(path) if verify else read_manifest(path)
        return cls(path, manifest)

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt the model was trained on (the template travels in the manifest)."""
        return self.prompt.render(instruction, input)

    def encode(self, text: str) -> list[int]:
        """The prompt's ids, special tokens (BOS) included exactly as training added them:
        the export's parity check compares these ids with the training tokenizer's."""
        if self.format == FORMAT_RANKING:  # an encoder's ids carry its special tokens
            return list(self._tokenizer.encode(text).ids)
        if self.format == FORMAT_GENAI:
            return [int(t) for t in self._tokenizer.encode(text)]
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        if self.format == FORMAT_GENAI:
            return str(self._tokenizer.decode(ids)) if ids else ""
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32) -> list[int]:
        """Greedy continuation of ``prompt_ids``: new tokens, up to (not including) EOS."""
        if not prompt_ids:
            raise BundleError("the prompt is empty")
        if self.format == FORMAT_GENAI:
            return self._generate_genai(prompt_ids, max_new_tokens)
        return self._generate_logits(prompt_ids, max_new_tokens)

    def generate(
        self,
        prompt: str | None = None,
        *,
        instruction: str | None = None,
        input: str = "",
        max_new_tokens: int = 32,
    ) -> str:
        """The greedy answer to a raw ``prompt`` or to an instruction (and input)."""
        if prompt is None:
            if not instruction:
                raise BundleError("give a prompt, or an instruction (and an input)")
            prompt = self.render(instruction, input)
        ids = self.generate_ids(self.encode(prompt), max_new_tokens)
        if len(ids) == max_new_tokens:  # cut by the budget, maybe inside a character
            ids = self._whole_characters(ids)
        return self.decode(ids)

    def _whole_characters(self, ids: list[int]) -> list[int]:
        """``ids`` without the trailing tokens of a character the budget cut off.

        A byte-level model spends 3 tokens on a CJK character; cut after one or two, the
        answer would end in U+FFFD. A UTF-8 character is at most 4 bytes, so at most 3
        tokens go."""
        for drop in range(min(4, len(ids))):
            if not self.decode(ids[: len(ids) - drop]).endswith("\ufffd"):
                return ids[: len(ids) - drop]
        return ids

    def answer(self, task: str | None, instruction: str, input: str = "") -> str:
        """The answer to one record: ranked among ``task``'s candidates, or generated
        (a generative bundle ignores ``task``)."""
        return self.answer_many([(task, instruction, input)])[0]

    def answer_many(
        self, records: list[tuple[str | None, str, str]], batch_size: int = 32
    ) -> list[str]:
        """Answers to (task, instruction, input) records, in order; a ranking bundle embeds
        them ``batch_size`` per ONNX call, grouped by length."""
        if self.format != FORMAT_RANKING:
            return [self.generate(instruction=i, input=x) for _, i, x in records]
        for task, _, _ in records:
            self._known(task)
        prompts = [self.render(i, x) for _, i, x in records]
        vectors = self.embed(prompts, batch_size) if records else []
        return [self.pick(str(t), v) for (t, _, _), v in zip(records, vectors, strict=True)]

    def _known(self, task: str | None) -> None:
        if task is None or task not in self.candidates:
            known = ", ".join(sorted(self.candidates)) or "none"
            what = "a task" if task is None else f"task {task!r}"
            raise BundleError(
                f"bundle v{self.version} ranks answers per task and needs {what} it knows: {known}"
            )

    def embed(self, texts: list[str], batch_size: int = 32) -> Any:
        """Normalised embeddings of ``texts`` (ranking bundles), numpy [len(texts), dim], in
        order. Runs ``batch_size`` texts per ONNX call, grouped by length (less padding)."""
        import numpy as np

        if self.format != FORMAT_RANKING:
            raise BundleError("embeddings are only exposed by onnx-ranking bundles")
        rows = [self.encode(t) for t in texts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: Any = None
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start : start + max(1, batch_size)]
            width = max(len(rows[i]) for i in idx)
            ids = np.full((len(idx), width), self.pad_token_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i])], mask[j, : len(rows[i])] = rows[i], 1
            got = self._session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
            if out is None:
                out = np.zeros((len(rows), got.shape[1]), dtype=got.dtype)
            out[idx] = got
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def pick(self, task: str, vector: Any) -> str:
        """The candidate of ``task`` nearest ``vector`` (cosine: both are normalised)."""
        self._known(task)
        return self.candidates[task][int((self._vectors[task] @ vector).argmax())]

    def logits(self, prompt_ids: list[int]) -> Any:
        """Next-token logits at every position (onnx-logits format only), numpy [seq, vocab]."""
        import numpy as np

        if self._session is None:
            raise BundleError("logits are only exposed by onnx-logits bundles")
        ids = np.asarray([prompt_ids], dtype=np.int64)
        out = self._session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return out[0][0]

    def _generate_genai(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        import onnxruntime_genai as og

        context = int(self.manifest.get("context_length") or 0)
        with self._generator_lock:
            if not context:  # no known window: a generator sized for this call
                params = og.GeneratorParams(self._model)
                params.set_search_options(
                    max_length=len(prompt_ids) + max_new_tokens, do_sample=False
                )
                return self._decode_genai(
                    og.Generator(self._model, params), prompt_ids, max_new_tokens
                )
            if self._generator is None:
                params = og.GeneratorParams(self._model)
                params.set_search_options(max_length=context, do_sample=False)
                self._generator = og.Generator(self._model, params)
            else:
                self._generator.rewind_to(0)
            try:
                return self._decode_genai(self._generator, prompt_ids, max_new_tokens)
            except Exception:
                self._generator = None  # e.g. a prompt past the window: start clean next time
                raise

    def _decode_genai(
        self, generator: Any, prompt_ids: list[int], max_new_tokens: int
    ) -> list[int]:
        generator.append_tokens(prompt_ids)
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token == self.eos_token_id:
                break
            out.append(token)
        return out

    def _generate_logits(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = list(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.logits(ids)[-1].argmax())
            if token == self.eos_token_id:
                break
            out.append(token)
            ids.append(token)
        return out
