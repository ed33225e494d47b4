"""The LoRA adapter: its settings, attaching a fresh one, saving it in PEFT format, detaching it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from aftertune.store.files import staged_dir


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings; ``alpha=None`` means ``2 * r`` (scaling = alpha / r = 2).

    No defaults here: the daemon's settings (``[lora]``) are the one source of them.
    """

    r: int
    alpha: int | None
    dropout: float
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be a positive int, got {self.r!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2 * self.r)
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, int) or self.alpha < 1:
            raise ValueError(f"LoRA alpha must be a positive int, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            raise ValueError("LoRA target_modules must be a sequence of names, not one string")
        modules = tuple(self.target_modules)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"LoRA target_modules must be non-empty names, got {modules!r}")
        object.__setattr__(self, "target_modules", modules)

    @property
    def scaling(self) -> float:
        return float(self.alpha or 2 * self.r) / self.r


def attach_fresh_adapter(
    model: nn.Module, spec: LoraSpec, task_type: str = "CAUSAL_LM"
) -> nn.Module:
    """Wrap ``model`` with a new, zero-delta LoRA adapter (peft; B starts at zero).

    ``task_type`` is peft's name for the model kind's task (``CAUSAL_LM`` for the generative
    kind, ``FEATURE_EXTRACTION`` for the ranking encoder).

    Uses the global torch RNG for A's init: seed it first for a reproducible adapter.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha or 2 * spec.r,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
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
