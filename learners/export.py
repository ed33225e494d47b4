"""What exporting a champion is told (``ExportSpec``) and gives back (``ExportResult``).

Each model kind exports in its own way (``kinds/generative/export.py``: onnxruntime-genai or
torch.onnx logits; ``kinds/ranking/export.py``: the encoder and its candidates); both take
this spec and return this result, and promotion sees only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from aftertune.learners.spec_config import SPEC_CONFIG
from aftertune.store.prompt import PromptTemplate

Method = Literal["auto", "genai", "torch"]
Precision = Literal["fp32", "int8", "int4"]
Target = Literal["cpu", "cuda"]
METHODS: tuple[Method, ...] = get_args(Method)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
TARGETS: tuple[Target, ...] = get_args(Target)


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class ExportOptions:
    """``[export]``: how a champion becomes a bundle, parity-checked before it is published."""

    method: Method = Field(
        default="auto",
        description="auto: onnxruntime-genai builder, torch.onnx fallback; or force one",
    )
    precision: Precision = "fp32"
    target: Target = "cpu"
    parity_prompts: int = Field(default=32, ge=1, description="regression prompts compared")
    parity_max_new_tokens: int = Field(default=16, ge=1)
    min_token_agreement: float = Field(
        default=0.95, description="int8/int4: greedy tokens equal to PyTorch (fp32: all of them)"
    )
    logits_atol: float = Field(default=1e-3, gt=0, description="fp32 max |Δ logit| allowed")
    embedding_atol: float = Field(
        default=1e-4, gt=0, description="ranking bundles: max |Δ embedding| allowed"
    )

    @field_validator("method", "precision", "target", mode="before")
    @classmethod
    def _one_of(cls, value: Any, info: ValidationInfo) -> Any:
        # Before the Literal check: the message names the setting and lists the choices.
        name = str(info.field_name)
        known = {"method": METHODS, "precision": PRECISIONS, "target": TARGETS}[name]
        if value not in known:
            raise ValueError(
                f"{'export method' if name == 'method' else name} must be one of {known}, got {value!r}"
            )
        return value

    @field_validator("min_token_agreement")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("min_token_agreement must be within [0, 1]")
        return value

    def __post_init__(self) -> None:
        if self.method == "torch" and self.precision != "fp32":
            raise ValueError("the torch.onnx fallback exports fp32 only")


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class ExportSpec(ExportOptions):
    """What exporting is told: ``[export]`` and the ``[prompt]`` template, which is written to
    the manifest: consumers render prompts with it."""

    template: PromptTemplate


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
