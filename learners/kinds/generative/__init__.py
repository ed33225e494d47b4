"""The generative model kind: a causal LM (``embedded:tiny`` or any local HF causal LM).

Its answer is decoded greedily; it learns by next-token cross-entropy on the response
(``objective.py``), its Fisher is that loss's per-example squared gradient (``fisher.py``), it
is scored by exact match / token F1 and NLL (``scoring.py``) and exported to ONNX with
onnxruntime-genai or torch.onnx (``export.py``).
"""

from __future__ import annotations

from aftertune.learners.kinds.generative.kind import Generative

__all__ = ["Generative"]
