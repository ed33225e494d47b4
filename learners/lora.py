"""The LoRA adapter: its settings, which layers it adapts, attaching a fresh one, saving it in
PEFT format, detaching it.

Which layers: ``target_modules`` is either module names matched as peft matches a list (a
module whose name equals one or ends with ``.<name>``), or ``["all-linear"]``, peft's
shorthand: every linear-like layer of the model (``nn.Linear`` and GPT-2's ``Conv1D``) but
the output layer. Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are covered
without naming them. :func:`adapted_modules` resolves either form once, to full module
names; the adapter gets exactly those names and EWC takes its Fisher over exactly those
weights, so the two never disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from aftertune.learners.errors import LearnerError
from aftertune.learners.training_specs import ALL_LINEAR, LoraSpec
from aftertune.store.files import staged_dir


def _is_linear_like(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with its weight stored (in, out).
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    """A GPT-2-style ``Conv1D``: weight (in, out), ``y = x @ W + b``."""
    return type(module).__name__ == "Conv1D"


def adapted_modules(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Module]:
    """``{full module name: module}`` of every linear-like layer ``target_modules`` selects.

    Raises LearnerError when nothing matches: an adapter on no layer would learn nothing.
    """
    if tuple(target_modules) == (ALL_LINEAR,):
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        found = {
            name: module
            for name, module in model.named_modules()
            if _is_linear_like(module) and module is not output
        }
    else:
        found = {
            name: module
            for name, module in model.named_modules()
            if _is_linear_like(module)
            and any(name == t or name.endswith("." + t) for t in target_modules)
        }
    if not found:
        raise LearnerError(
            f"no linear layer of the model matches lora.target_modules={list(target_modules)};"
            f" use [{ALL_LINEAR!r}] or names from model.named_modules()"
        )
    return found


def describe_modules(names: Sequence[str]) -> dict[str, int]:
    """``{leaf name: count}`` of adapted modules, e.g. ``{"qkv_proj": 32, "o_proj": 32}``."""
    return dict(sorted(Counter(name.rsplit(".", 1)[-1] for name in names).items()))


def attach_fresh_adapter(
    model: nn.Module, spec: LoraSpec, task_type: str = "CAUSAL_LM"
) -> nn.Module:
    """Wrap ``model`` with a new, zero-delta LoRA adapter (peft; B starts at zero) on the
    modules :func:`adapted_modules` selects.

    ``task_type`` is peft's name for the model kind's task (``CAUSAL_LM`` for the generative
    kind, ``FEATURE_EXTRACTION`` for the ranking encoder).

    Uses the global torch RNG for A's init: seed it first for a reproducible adapter.
    """
    from peft import LoraConfig, get_peft_model

    modules = adapted_modules(model, spec.target_modules)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha or 2 * spec.r,
        lora_dropout=spec.dropout,
        target_modules=sorted(modules),
        # Conv1D stores its weight transposed; peft must know, or it warns and flips it itself.
        fan_in_fan_out=any(is_conv1d(m) for m in modules.values()),
        bias="none",
        task_type=task_type,
    )
    return get_peft_model(model, config)


def detach_adapter(peft_model: nn.Module, requires_grad: dict[str, bool]) -> nn.Module:
    """Remove the adapter without merging; restore the base parameters' ``requires_grad``."""
    base = peft_model.unload()  # type: ignore[operator]
    for name, p in base.named_parameters():
        p.requires_grad_(requires_grad.get(name, p.requires_grad))
    # peft leaves its config on the base model; a later get_peft_model must start clean.
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(base):
            delattr(base, attr)
    return base


def save_adapter(peft_model: nn.Module, out_dir: Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[operator]
    return out_dir
