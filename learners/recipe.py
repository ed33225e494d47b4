"""The LoRA recipe: one cycle's fresh adapter on the champion, the loop written out.

setup (encode data, Fisher, attach adapter, optimizer, resume) → train (steps of
``grad_accum`` micro-batches, each mixing new and replayed examples, + EWC penalty) →
save (adapter in PEFT format, atomically) → cleanup (adapter removed, base untouched).

The data stream is a pure function of (seed, epoch), so the data position in a checkpoint
is just the step count: resume recomputes the plan and skips what was consumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from aftertune.learners.data import (
    Encoded,
    ExampleLike,
    collate,
    encode_examples,
    pad_id,
    response_loss,
)
from aftertune.learners.errors import CheckpointError, LearnerError
from aftertune.learners.ewc import (
    EwcSpec,
    estimate_fisher,
    ewc_penalty,
    fisher_champion,
    load_fisher,
    target_weights,
    update_online_fisher,
    weights_fingerprint,
)
from aftertune.learners.lora import (
    LoraSpec,
    attach_fresh_adapter,
    detach_adapter,
    fsync_tree,
    save_adapter,
)
from aftertune.learners.prompt import DEFAULT_PROMPT, PromptTemplate
from aftertune.learners.replay import ReplaySpec, cap_pool, mix_batches

log = logging.getLogger(__name__)

__all__ = ["EwcSpec", "LoraSpec", "ReplaySpec", "TrainResult", "TrainSpec", "train_adapter"]


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings of one cycle. ``batch_size`` counts new + replayed examples."""

    lr: float = 1e-3  # tiny models take a higher LoRA lr than the usual 1e-4..3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int | None = None  # None: ``epochs`` passes over the new examples
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    max_length: int = 256  # tokens (bytes for the embedded model) per example
    checkpoint_every: int = 0  # steps; 0 disables checkpoints
    device: str = "auto"  # "auto": CUDA when present (bf16 autocast), else CPU fp32
    progress: bool = True
    schedule: str = "cosine"  # decay after warmup: "cosine" or "linear", down to 0
    template: PromptTemplate = field(default=DEFAULT_PROMPT)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_grad_norm < 0 or self.checkpoint_every < 0:
            raise ValueError("max_grad_norm and checkpoint_every must be >= 0")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda[:n]' or 'mps', got {self.device!r}"
            )


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    new_examples: int
    replay_examples: int  # distinct replay examples the cycle could draw from
    loss_first: float  # mean data loss (no EWC term) of the first step
    loss_last: float  # ... of the last step
    tokens_per_s: float  # non-pad tokens through forward+backward per second of training
    fisher_seconds: float
    train_seconds: float
    truncated: int  # examples (new + replay) with prompt or response cut
    resumed_from_step: int = 0
    ewc_penalty_last: float = 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine or linear decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def train_adapter(
    model: nn.Module,
    tokenizer: Any,
    new: Sequence[ExampleLike],
    replay: Sequence[ExampleLike],
    *,
    train: TrainSpec,
    lora: LoraSpec,
    replay_spec: ReplaySpec,
    ewc: EwcSpec | None,
    fisher_path: Path | None,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train a fresh LoRA adapter on ``model`` (the champion) and save it to ``out_dir``.

    The model is moved to the training device and returned to its caller clean: the adapter is
    removed (not merged) and no base weight changes. With ``checkpoint_dir`` a crashed run
    resumes from its last checkpoint and reaches the same adapter.
    """
    if not new:
        raise LearnerError("train_adapter needs at least one new example; nothing to learn")
    device = resolve_device(train.device)
    model.to(device)
    amp = device.type == "cuda"

    # --- setup: data
    pool = [replay[i] for i in cap_pool(replay, replay_spec, train.seed)]
    new_enc, new_cut = encode_examples(
        tokenizer, new, max_length=train.max_length, template=train.template, what="new examples"
    )
    pool_enc, pool_cut = encode_examples(
        tokenizer,
        pool,
        max_length=train.max_length,
        template=train.template,
        what="replay examples",
    )
    plans: dict[int, list[list[Encoded]]] = {}

    def epoch_batches(epoch: int) -> list[list[Encoded]]:
        if epoch not in plans:
            mixed = mix_batches(
                new, pool, replay_spec, batch_size=train.batch_size, seed=train.seed, epoch=epoch
            )
            plans[epoch] = [
                [new_enc[i] for i in b.new] + [pool_enc[j] for j in b.replay] for b in mixed
            ]
        return plans[epoch]

    micro_per_epoch = len(epoch_batches(0))
    total_steps = train.max_steps or math.ceil(train.epochs * micro_per_epoch / train.grad_accum)

    # --- setup: Fisher of the champion (before the adapter exists, so names are the plain ones)
    fisher, fisher_seconds = _fisher_for_cycle(
        model, tokenizer, pool, train, lora, ewc, fisher_path, device
    )
    if fisher is not None:
        fisher = {k: v.to(device) for k, v in fisher.items()}

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(train.seed)  # A's init and dropout: reproducible, caller's RNG untouched
        peft_model = attach_fresh_adapter(model, lora)
        try:
            result = _train(
                peft_model, tokenizer, epoch_batches, micro_per_epoch, total_steps, train, lora,
                replay_spec, ewc, fisher, device, amp, checkpoint_dir,
                run_id=_run_id(new, pool, train, lora, replay_spec, ewc),
            )  # fmt: skip
            save_adapter(peft_model, out_dir)
        finally:
            detach_adapter(peft_model, requires_grad)
    if checkpoint_dir is not None:
        clear_checkpoints(checkpoint_dir)  # the adapter is saved; nothing left to resume
    steps, loss_first, loss_last, tokens, seconds, resumed, penalty_last = result
    return TrainResult(
        adapter_dir=Path(out_dir),
        steps=steps,
        new_examples=len(new),
        replay_examples=len(pool),
        loss_first=loss_first,
        loss_last=loss_last,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        fisher_seconds=fisher_seconds,
        train_seconds=seconds,
        truncated=new_cut.truncated + pool_cut.truncated,
        resumed_from_step=resumed,
        ewc_penalty_last=penalty_last,
    )


def _train(
    peft_model: nn.Module,
    tokenizer: Any,
    epoch_batches: Any,
    micro_per_epoch: int,
    total_steps: int,
    train: TrainSpec,
    lora: LoraSpec,
    replay_spec: ReplaySpec,
    ewc: EwcSpec | None,
    fisher: dict[str, torch.Tensor] | None,
    device: torch.device,
    amp: bool,
    checkpoint_dir: Path | None,
    run_id: str,
) -> tuple[int, float, float, int, float, int, float]:
    """The loop. Returns (steps, loss_first, loss_last, tokens, seconds, resumed_from, penalty)."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup=train.warmup_steps, total=total_steps, schedule=train.schedule
        ),
    )
    step, loss_first, tokens, seconds = 0, float("nan"), 0, 0.0
    if checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, run_id, params, optimizer, scheduler, device)
        if state is not None:
            step, loss_first = state["step"], state["loss_first"]
            tokens, seconds = state["tokens"], state["seconds"]
            log.info(
                "resuming cycle training at step %d/%d from %s", step, total_steps, checkpoint_dir
            )
    resumed_from = step
    pad = pad_id(tokenizer)
    lam = ewc.lam if ewc is not None and ewc.enabled else 0.0
    penalty_fisher = fisher if lam > 0 else None
    loss_last, penalty_value = float("nan"), 0.0
    stream = _micro_batches(epoch_batches, micro_per_epoch, train, start=step * train.grad_accum)
    bar = tqdm(
        total=total_steps, initial=step, disable=not train.progress, desc="adapter", unit="step"
    )
    peft_model.train()
    while step < total_steps:
        group = [b for _, (_, b) in zip(range(train.grad_accum), stream, strict=False)]
        if not group:
            break  # epochs exhausted (only with max_steps=None and rounding)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for chunk in group:
            batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = peft_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            loss = response_loss(logits, batch["labels"], batch["weights"]) / len(group)
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if penalty_fisher is not None:
            penalty = ewc_penalty(peft_model, penalty_fisher, lam)
            penalty.backward()  # once per optimizer step, whatever grad_accum is
            penalty_value = penalty.item()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        seconds += time.perf_counter() - started
        loss_first = step_loss if math.isnan(loss_first) else loss_first
        loss_last = step_loss
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", ewc=f"{penalty_value:.2e}", refresh=False)
        if (
            checkpoint_dir is not None
            and train.checkpoint_every
            and step % train.checkpoint_every == 0
        ):
            save_checkpoint(
                checkpoint_dir, run_id, params, optimizer, scheduler, device,
                {"step": step, "loss_first": loss_first, "tokens": tokens, "seconds": seconds},
            )  # fmt: skip
    bar.close()
    return step, loss_first, loss_last, tokens, seconds, resumed_from, penalty_value


def _micro_batches(
    epoch_batches: Any, micro_per_epoch: int, train: TrainSpec, *, start: int
) -> Iterator[tuple[int, list[Encoded]]]:
    """Micro-batches from position ``start`` on; endless when ``max_steps`` is set."""
    epoch, index = divmod(start, micro_per_epoch)
    while train.max_steps is not None or epoch < train.epochs:
        batches = epoch_batches(epoch)
        for i in range(index, len(batches)):
            yield epoch, batches[i]
        epoch, index = epoch + 1, 0


def _fisher_for_cycle(
    model: nn.Module,
    tokenizer: Any,
    pool: Sequence[ExampleLike],
    train: TrainSpec,
    lora: LoraSpec,
    ewc: EwcSpec | None,
    fisher_path: Path | None,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor] | None, float]:
    """The (online) Fisher to penalise with, and the seconds spent on it."""
    if ewc is None or not ewc.enabled or ewc.lam == 0:
        return None, 0.0
    started = time.perf_counter()
    champion = weights_fingerprint(target_weights(model, lora.target_modules))
    if (
        fisher_path is not None
        and fisher_path.exists()
        and fisher_champion(fisher_path) == champion
    ):
        log.info("champion unchanged since the stored Fisher; reusing %s", fisher_path)
        return load_fisher(fisher_path), time.perf_counter() - started
    if not pool:
        if fisher_path is not None and fisher_path.exists():
            # No past data to measure on, but the carried Fisher still protects older tasks.
            log.warning(
                "no replay examples to estimate the Fisher on; using the stored one decayed"
            )
            old = load_fisher(fisher_path)
            return {k: v * ewc.decay for k, v in old.items()}, time.perf_counter() - started
        log.info("no replay examples and no stored Fisher: EWC is off this cycle")
        return None, 0.0
    # Every pool example is a candidate; a seeded pick keeps tasks mixed when capped.
    step = max(1, len(pool) // ewc.fisher_samples)
    samples = list(pool[::step])[: ewc.fisher_samples]
    fresh = estimate_fisher(
        model, tokenizer, samples, lora.target_modules, batch_size=1,
        max_length=train.max_length, device=device,
    )  # fmt: skip
    if fisher_path is not None:
        fresh = update_online_fisher(fisher_path, fresh, ewc.decay, champion=champion)
    seconds = time.perf_counter() - started
    log.info("Fisher over %d weights from %d examples in %.1fs", len(fresh), len(samples), seconds)
    return fresh, seconds


def _run_id(
    new: Sequence[ExampleLike],
    pool: Sequence[ExampleLike],
    train: TrainSpec,
    lora: LoraSpec,
    replay_spec: ReplaySpec,
    ewc: EwcSpec | None,
) -> str:
    """What a checkpoint must match to be resumed: the data and every setting that shapes it."""
    h = hashlib.sha256()
    settings = asdict(train)
    for volatile in ("progress", "checkpoint_every", "device"):
        settings.pop(volatile)
    settings["template"] = [train.template.with_input, train.template.without_input]
    blob = {
        "train": settings,
        "lora": asdict(lora),
        "replay": asdict(replay_spec),
        "ewc": asdict(ewc) if ewc else None,
    }
    h.update(json.dumps(blob, sort_keys=True).encode())
    for group in (new, pool):
        h.update(b"\x00group")
        for ex in group:
            for part in (
                ex.task,
                ex.instruction,
                ex.input,
                ex.output,
                str(getattr(ex, "weight", 1.0)),
            ):
                h.update(part.encode())
                h.update(b"\x1f")
    return h.hexdigest()


# --- checkpoints: safetensors for tensors, JSON for the rest; a step directory appears whole.


def save_checkpoint(
    checkpoint_dir: Path,
    run_id: str,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    state: dict[str, Any],
) -> Path:
    """Adapter weights, optimizer, scheduler, RNG and position, as ``step-NNNNNNNN/``."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=checkpoint_dir))
    try:
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in params.items()},
            tmp / "adapter.safetensors",
        )
        opt = optimizer.state_dict()
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_scalars: dict[str, dict[str, Any]] = {}
        for idx, slots in opt["state"].items():
            for key, value in slots.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    opt_scalars.setdefault(str(idx), {})[key] = value
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_file(rng, tmp / "rng.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {
            "run_id": run_id,
            "state": state,
            "param_names": list(params),
            "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
            "scheduler": sched,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        fsync_tree(tmp)
        final = checkpoint_dir / f"step-{state['step']:08d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    checkpoint_dir: Path,
    run_id: str,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> dict[str, Any] | None:
    """Restore the newest checkpoint of this run into the given objects; None if there is none."""
    found = sorted(p for p in Path(checkpoint_dir).glob("step-*") if (p / "state.json").exists())
    if not found:
        return None
    path = found[-1]
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {path}/state.json ({exc}); delete {path} to start over"
        ) from exc
    if meta.get("run_id") != run_id:
        log.warning(
            "checkpoint %s belongs to another run (data or settings differ); starting fresh", path
        )
        return None
    if meta["param_names"] != list(params):
        raise CheckpointError(f"{path} holds other adapter parameters; delete it to start over")
    adapter = load_file(str(path / "adapter.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(adapter[name].to(p.device, p.dtype))
    tensors = load_file(str(path / "optimizer.safetensors"))
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, _, slot = key.partition(".")
        slots.setdefault(int(idx), {})[slot] = value
    for idx, scalars in meta["optimizer"]["scalars"].items():
        slots.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": slots, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(
        {**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return dict(meta["state"])


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Remove this run's checkpoints (after its adapter is saved)."""
    for old in Path(checkpoint_dir).glob("step-*"):
        shutil.rmtree(old, ignore_errors=True)
