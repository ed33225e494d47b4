"""The consumer side: everything a program that uses aftertune's models needs, and no torch.

| module | what a consumer's author finds there |
|---|---|
| ``bundle.py`` | ``Bundle.open(DIR)``: a verified bundle answering prompts with ONNX Runtime |
| ``runtime.py`` | what each format's runtime gives the ``Bundle`` (``Runtime`` and friends) |
| ``genai.py``, ``logits.py``, ``ranking.py`` | one runtime per bundle format |
| ``format.py`` | the bundle format: ``manifest.json``, its checks, ``verify_bundle`` |
| ``pull.py`` | ``aftertune pull``: fetch a published bundle, verify every byte, switch ``current`` |
| ``producer.py`` | ``Producer``: push feedback records onto the stream (``XADD``) |

``from aftertune.store.consumer import Bundle`` is the entry point. Nothing here imports
torch, the learners or the daemon; the producer alone imports redis, so it is imported from
its module, not from here.
"""

from __future__ import annotations

from aftertune.store.consumer.bundle import Bundle

__all__ = ["Bundle"]
