"""What training an adapter is told: its shape (``LoraSpec``), the optimisation (``TrainSpec``),
replay (``ReplaySpec``) and the EWC penalty (``EwcSpec``).

Each knob is declared here once, with its default, bounds and meaning: these classes are the
daemon's ``[lora]``, ``[train]``, ``[replay]`` and ``[ewc]`` settings sections, validated by
pydantic, and the learners get instances of them (never the daemon's ``Settings``).
``TrainSpec`` adds what ``[train]`` does not set: lr and epochs resolved for the model kind,
and the ``[prompt]`` template. Torch-free, so the settings import it on the light paths.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from aftertune.learners.spec_config import SPEC_CONFIG
from aftertune.store.prompt import PromptTemplate

# Every linear layer of the decoder (attention and MLP, fused projections and GPT-2's Conv1D
# included; not the output layer), as peft's "all-linear" means it: for small models LoRA on
# all of them learns clearly more than on q/v only, at little cost. Or a list of module names.
ALL_LINEAR = "all-linear"
# A seed goes to random, numpy and torch.manual_seed; numpy takes 0..2**32 - 1 (2**70 used to
# pass the settings and then crash `train` with an OverflowError).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class LoraSpec:
    """``[lora]``: the adapter's shape. ``alpha`` unset means ``2 * r`` (scaling = alpha / r = 2)."""

    r: int = Field(default=16, ge=1, description="rank of the adapter")
    alpha: int | None = Field(default=None, ge=1, description="default 2 * r")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(
        default=(ALL_LINEAR,),
        min_length=1,
        description="['all-linear'] or module names (peft's rules)",
    )

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, modules: tuple[str, ...]) -> tuple[str, ...]:
        if not all(modules):
            raise ValueError(f"LoRA target_modules must be non-empty names, got {modules!r}")
        if ALL_LINEAR in modules and len(modules) > 1:
            raise ValueError(f"LoRA target_modules: {ALL_LINEAR!r} stands alone, got {modules!r}")
        return modules

    def __post_init__(self) -> None:
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2 * self.r)

    @property
    def scaling(self) -> float:
        return float(self.alpha or 2 * self.r) / self.r


@dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class TrainOptions:
    """``[train]``: how one cycle optimises. ``batch_size`` counts new + replayed examples.

    ``lr`` and ``epochs`` unset: the model kind's defaults (``TrainSpec`` has them resolved).
    """

    lr: float | None = Field(
        default=None, gt=0, description="peak learning rate; unset: 4e-3 generative, 1e-3 ranking"
    )
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0, description="linear warmup from 0 to lr")
    schedule: Literal["cosine", "linear"] = Field(
        default="cosine", description="decay to 0 after warmup"
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="fixed optimizer steps per cycle instead of `epochs`"
    )
    # Passes over the new data; replayed examples ride along in each batch. A fixed step
    # count instead gives a replaying cycle half the new data (bench/continual.py measured
    # the last task at ~40 points with 200 steps, ~90 with 3 passes).
    epochs: int | None = Field(default=None, ge=1, description="unset: 3 generative, 2 ranking")
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float = Field(default=1.0, ge=0, description="0 disables clipping")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    max_length: int = Field(default=256, ge=8, description="tokens per example")
    checkpoint_every: int = Field(default=25, ge=0, description="optimizer steps; 0 = never")
    max_seconds: float = Field(
        default=3600.0,
        gt=0,
        le=365 * 24 * 3600.0,
        description="a cycle's training budget: when spent, it checkpoints and stops warm, and"
        " the next cycle resumes it",
    )
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda[:n]")
    progress: bool = True
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "data-parallel training processes on this host (torchrun; one GPU each on CUDA); "
            "a step's grad_accum micro-batches are dealt out among them"
        ),
    )

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        # "auto": CUDA when present (bf16 autocast), else CPU fp32
        if device != "auto" and not device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:n]' or 'mps', got {device!r}")
        return device


@dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class TrainSpec(TrainOptions):
    """What one training run is told: ``[train]`` with ``lr`` and ``epochs`` resolved for the
    model kind, and the ``[prompt]`` template it renders examples with."""

    lr: float = Field(gt=0)  # peak; tiny models take a higher LoRA lr than the usual 1e-4..3e-4
    epochs: int = Field(ge=1)  # passes over the new examples when ``max_steps`` is None
    template: PromptTemplate


@dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class EwcSpec:
    """``[ewc]``: how strongly the adapter is held near the champion on weights that mattered
    before."""

    enabled: bool = True
    # 1e2 beside replay (the default): on the real ranking suite replay+EWC scored AA 80.0 /
    # BWT -1.0 at 1e2 against 78.0 / -2.0 at 1e3, equal on the tiny suites; the online Fisher
    # grows over cycles (up to 10x at decay 0.9), so a lower λ keeps room for new tasks. EWC
    # alone (replay off) needs ~1e3: at 1e2 it kept less (BWT -7.0 against -1.5).
    lam: float = Field(default=1e2, ge=0, description="penalty weight (λ/2 · Σ F ΔW²)")
    decay: float = Field(
        default=0.9, ge=0, le=1, description="online EWC: weight of the Fisher of past champions"
    )
    fisher_samples: int = Field(
        default=64, ge=1, description="replay examples the Fisher is estimated on"
    )


@dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class ReplaySpec:
    """``[replay]``: how much of the past is replayed in a cycle (``replay.py`` draws it)."""

    enabled: bool = True
    ratio: float = Field(
        default=1.0, ge=0, le=64, description="replayed examples per new example in each batch"
    )
    cap: int = Field(default=2000, ge=0, description="most replay examples in one cycle")
