"""The LoRA recipe: one cycle's fresh adapter on the champion, the loop written out.

torchtune-style: ``LoraRecipe`` does setup (data, Fisher, fresh adapter, optimizer, resume)
→ train (optimizer steps of ``grad_accum`` micro-batches, each mixing new and replayed
examples, plus the EWC term once per step) → save_checkpoint / save_adapter → cleanup
(adapter removed, base untouched). ``train_adapter`` is the entry point others call.

The data stream is a pure function of (seed, epoch), so a checkpoint's data position is
its step count: resume recomputes the plan and skips what was consumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter
from torch import nn

from aftertune.learners.base_model import resolve_device
from aftertune.learners.checkpoint import clear_checkpoints, load_checkpoint, save_checkpoint
from aftertune.learners.data import Encoded, ExampleLike
from aftertune.learners.distributed import Ranks, any_rank, sum_gradients, summed
from aftertune.learners.errors import LearnerError, NonFiniteLoss, TrainingInterrupted
from aftertune.learners.ewc import EwcPenalty, fisher_for_cycle
from aftertune.learners.lora import (
    adapted_modules,
    attach_fresh_adapter,
    describe_modules,
    detach_adapter,
    save_adapter,
)
from aftertune.learners.objective import Objective
from aftertune.learners.replay import mix_batches, remember
from aftertune.learners.training_specs import EwcSpec, LoraSpec, ReplaySpec, TrainSpec
from aftertune.store.progress import Progress

log = logging.getLogger(__name__)

__all__ = [
    "EwcSpec",
    "LoraSpec",
    "ReplaySpec",
    "TrainExample",
    "TrainJob",
    "TrainResult",
    "TrainSpec",
    "train_adapter",
]


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    new_examples: int
    replay_examples: int  # distinct replay examples the cycle drew from (after the cap)
    loss_first: float  # data loss (no EWC term) of the first optimizer step
    loss_last: float  # ... of the last one
    tokens_per_s: float  # non-pad tokens through forward + backward per training second
    fisher_seconds: float
    train_seconds: float
    truncated: int  # examples (new + replay) with their prompt or response cut
    resumed_from_step: int = 0
    ewc_penalty_last: float = 0.0
    adapted_modules: dict[str, int] = field(default_factory=dict)  # leaf name -> layers


@dataclass
class _Position:
    """What a checkpoint carries besides tensors: where the loop is and what it measured."""

    step: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    tokens: int = 0
    seconds: float = 0.0
    penalty: float = 0.0


def lr_schedule(
    optimizer: torch.optim.Optimizer, *, warmup: int, total: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' linear warmup (from 0) to the peak lr, then cosine or linear decay to 0.

    A LambdaLR: its position travels in the checkpoint, the lambda is rebuilt from the spec.
    """
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = (
        get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    )
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=total)


@dataclass(frozen=True)
class TrainExample:
    """What training reads of an example (``data.ExampleLike`` with its weight)."""

    task: str
    instruction: str
    input: str
    output: str
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. a rating of a served answer

    @classmethod
    def of(cls, example: ExampleLike) -> TrainExample:
        e = example
        weight = float(getattr(e, "weight", 1.0))
        meta = dict(getattr(e, "meta", None) or {})
        return cls(e.task, e.instruction, e.input, e.output, weight, meta)


@dataclass(frozen=True)
class TrainJob:
    """What one training run takes: its examples, its specs, where it reads and writes.

    ``past`` is the sample of what the champion learned (``replay.sample_past``); the recipe
    splits it into replay and Fisher examples (``replay.remember``). A job crosses into
    torchrun's processes as JSON (``to_json``/``from_json``, pydantic), nothing by hand.
    """

    new: tuple[TrainExample, ...]
    past: tuple[TrainExample, ...]
    train: TrainSpec
    lora: LoraSpec
    replay: ReplaySpec
    ewc: EwcSpec | None  # None: no EWC penalty
    out_dir: Path  # the adapter is saved here
    fisher_path: Path | None = None  # the online Fisher carried across cycles
    checkpoint_dir: Path | None = None  # None: no checkpoints, no resume

    @classmethod
    def of(cls, new: Sequence[ExampleLike], past: Sequence[ExampleLike], **rest: Any) -> TrainJob:
        """A job on any examples (the store's, a benchmark's): only what training reads."""
        return cls(
            tuple(TrainExample.of(e) for e in new),
            tuple(TrainExample.of(e) for e in past),
            **rest,
        )

    def to_json(self) -> bytes:
        return _JOB_JSON.dump_json(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> TrainJob:
        return _JOB_JSON.validate_json(data)


_JOB_JSON: TypeAdapter[TrainJob] = TypeAdapter(TrainJob)


def train_adapter(
    model: nn.Module,
    tokenizer: Any,
    job: TrainJob,
    *,
    objective: Objective,
    should_stop: Callable[[int, int], bool] | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train a fresh LoRA adapter on ``model`` (the champion) and save it to ``job.out_dir``.

    The model is moved to the training device and handed back clean: the adapter is removed
    (not merged), no base weight changes. With ``job.checkpoint_dir`` a crashed run resumes
    from its last checkpoint and reaches the same adapter. ``should_stop(step, total_steps)``
    is asked after every step; True checkpoints (when a directory is set) and raises
    ``TrainingInterrupted``. ``objective`` is the model kind's loss (``ModelKind.objective``).
    With ``ranks`` this process is one of a data-parallel job (learners/distributed.py); rank
    0 writes the checkpoints and the adapter.
    """
    if not job.new:
        raise LearnerError("train_adapter needs at least one new example; nothing to learn")
    recipe = LoraRecipe(
        model,
        tokenizer,
        train=job.train,
        lora=job.lora,
        replay_spec=job.replay,
        ewc=job.ewc,
        objective=objective,
        ranks=ranks,
    )
    device = recipe.device
    # Seeding inside fork_rng: A's init and dropout are reproducible, the caller's RNG untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            recipe.setup(
                job.new, job.past, fisher_path=job.fisher_path, checkpoint_dir=job.checkpoint_dir
            )
            recipe.train(should_stop)
            if recipe.leader:
                save_adapter(recipe.peft_model, job.out_dir)
        finally:
            recipe.cleanup()
    if job.checkpoint_dir is not None and recipe.leader:
        clear_checkpoints(job.checkpoint_dir)  # the adapter is saved: nothing left to resume
    return recipe.result(Path(job.out_dir))


class LoraRecipe:
    """One cycle's training. Holds plain arguments, never a settings object."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        train: TrainSpec,
        lora: LoraSpec,
        replay_spec: ReplaySpec,
        ewc: EwcSpec | None,
        objective: Objective,
        ranks: Ranks | None = None,
    ) -> None:
        self.model, self.tokenizer, self.objective = model, tokenizer, objective
        self.spec, self.lora, self.replay_spec, self.ewc = train, lora, replay_spec, ewc
        self.ranks = ranks
        self.leader = ranks is None or ranks.leader
        self.device = resolve_device(train.device)
        if ranks is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", ranks.local_rank)  # one GPU per process
        self.amp = self.device.type == "cuda"  # bf16 autocast on CUDA; fp32 on CPU
        self.pos = _Position()
        self.resumed_from = 0
        self.fisher: dict[str, torch.Tensor] | None = None
        self.penalty: EwcPenalty | None = None
        self.fisher_seconds = 0.0
        self.peft_model: nn.Module | None = None
        self.adapted: dict[str, int] = {}
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._plans: dict[int, list[list[Encoded]]] = {}

    # --- setup

    def setup(
        self,
        new: Sequence[ExampleLike],
        replay: Sequence[ExampleLike],
        *,
        fisher_path: Path | None,
        checkpoint_dir: Path | None,
    ) -> None:
        spec = self.spec
        self.model.to(self.device)
        new, fisher_samples = self._data(new, replay)
        # The Fisher is taken on the champion before the adapter exists (plain module names),
        # on past examples whether or not they are also replayed in batches.
        self.fisher, self.fisher_seconds = fisher_for_cycle(
            self.model,
            self.tokenizer,
            fisher_samples,
            self.ewc,
            target_modules=self.lora.target_modules,
            max_length=spec.max_length,
            fisher_path=fisher_path,
            device=self.device,
            objective=self.objective,
        )
        if self.fisher is not None:
            self.fisher = {k: v.to(self.device) for k, v in self.fisher.items()}

        torch.manual_seed(spec.seed)
        self.adapted = describe_modules(list(adapted_modules(self.model, self.lora.target_modules)))
        self.peft_model = attach_fresh_adapter(
            self.model, self.lora, task_type=self.objective.peft_task_type
        )
        self.params = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        lam = self.ewc.lam if self.ewc is not None and self.ewc.enabled else 0.0
        if self.fisher is not None and lam > 0:
            self.penalty = EwcPenalty(self.peft_model, self.fisher, lam)
        self.fisher = None  # the penalty holds the Fisher now
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=spec.lr, weight_decay=spec.weight_decay
        )
        self.scheduler = lr_schedule(
            self.optimizer, warmup=spec.warmup_steps, total=self.total_steps, schedule=spec.schedule
        )
        self.checkpoint_dir = checkpoint_dir
        self.run_id = _run_id(new, self.pool, spec, self.lora, self.replay_spec, self.ewc)
        if checkpoint_dir is not None and self.load_checkpoint(checkpoint_dir):
            self.resumed_from = self.pos.step
            log.info(
                "resuming at step %d/%d from %s", self.pos.step, self.total_steps, checkpoint_dir
            )

    def _data(
        self, new: Sequence[ExampleLike], replay: Sequence[ExampleLike]
    ) -> tuple[Sequence[ExampleLike], Sequence[ExampleLike]]:
        """Encode the new examples and the replayed ones; plan the steps. Returns the new
        examples kept and the past ones the Fisher is estimated on (``replay.remember``).

        Examples of tasks the model kind refuses (a ranking kind's free-text tasks) are left
        out of the batches and of the Fisher; the objective logs how many and why.
        """
        spec = self.spec
        new = self.objective.kept(new, "new examples")
        replay = self.objective.kept(replay, "replay")
        if not new:
            raise LearnerError(
                "every new example belongs to a task this model kind cannot learn; see the"
                " warning above"
            )
        self.new = new
        memory = remember(replay, self.replay_spec, self.ewc, spec.seed)
        self.pool = memory.replay
        kw: dict[str, Any] = {"max_length": spec.max_length, "template": spec.template}
        encode = self.objective.encode
        self.new_enc, new_cut = encode(self.tokenizer, new, what="new examples", **kw)
        self.pool_enc, pool_cut = encode(self.tokenizer, self.pool, what="replay examples", **kw)
        self.truncated = new_cut.truncated + pool_cut.truncated
        self.micro_per_epoch = len(self._epoch(0))
        self.total_steps = spec.max_steps or math.ceil(
            spec.epochs * self.micro_per_epoch / spec.grad_accum
        )
        return new, memory.fisher

    def _epoch(self, epoch: int) -> list[list[Encoded]]:
        """The micro-batches of one epoch (the current epoch's plan is kept)."""
        if epoch not in self._plans:
            self._plans.clear()
            mixed = mix_batches(
                self.new,
                self.pool,
                self.replay_spec,
                batch_size=self.spec.batch_size,
                seed=self.spec.seed,
                epoch=epoch,
            )
            self._plans[epoch] = [
                [self.new_enc[i] for i in b.new] + [self.pool_enc[j] for j in b.replay]
                for b in mixed
            ]
        return self._plans[epoch]

    def _micro_batches(self, start: int) -> Iterator[list[Encoded]]:
        """Micro-batches from stream position ``start`` on; endless when ``max_steps`` is set."""
        epoch, index = divmod(start, self.micro_per_epoch)
        while self.spec.max_steps is not None or epoch < self.spec.epochs:
            yield from self._epoch(epoch)[index:]
            epoch, index = epoch + 1, 0

    # --- train

    def train(self, should_stop: Callable[[int, int], bool] | None = None) -> None:
        spec, pos, model = self.spec, self.pos, self.peft_model
        if model is None:
            raise LearnerError("LoraRecipe.train() called before setup()")
        stream = self._micro_batches(pos.step * spec.grad_accum)
        bar = Progress(
            "train adapter", self.total_steps, "step", enabled=spec.progress, initial=pos.step
        )
        model.train()
        while pos.step < self.total_steps:
            group = [b for _, b in zip(range(spec.grad_accum), stream, strict=False)]
            if not group:
                break  # the epochs ran out (max_steps=None)
            started = time.perf_counter()
            step_loss = self._step(model, group)
            pos.step += 1
            pos.seconds += time.perf_counter() - started
            pos.loss_first = step_loss if math.isnan(pos.loss_first) else pos.loss_first
            pos.loss_last = step_loss
            bar.update(1, loss=round(step_loss, 4), ewc=float(f"{pos.penalty:.3g}"))
            every = spec.checkpoint_every
            if self.checkpoint_dir is not None and every and pos.step % every == 0:
                self.save_checkpoint(self.checkpoint_dir)
            stop = should_stop is not None and should_stop(pos.step, self.total_steps)
            if self.ranks is not None:
                stop = any_rank(stop, self.device)  # every rank stops at the same step
            if stop and pos.step < self.total_steps:
                if self.checkpoint_dir is not None and not (every and pos.step % every == 0):
                    self.save_checkpoint(self.checkpoint_dir)
                bar.close()
                raise TrainingInterrupted(pos.step, self.checkpoint_dir)
        bar.close()

    def _step(self, model: nn.Module, group: list[list[Encoded]]) -> float:
        """One optimizer step over ``group`` (grad_accum micro-batches); returns its loss."""
        pos = self.pos
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, tokens = 0.0, 0
        share = group if self.ranks is None else self.ranks.share(group)
        for chunk in share:
            loss, seen = self.objective.loss(model, chunk, self.device, self.amp)
            loss = loss / len(group)
            value = loss.item()
            if not math.isfinite(value):  # a NaN step would poison the adapter for good
                raise NonFiniteLoss(
                    pos.step + 1, value, [e.weight for e in chunk], [e.task for e in chunk]
                )
            loss.backward()
            step_loss += value
            tokens += seen
        if self.penalty is not None and self.leader:
            self._add_penalty(self.penalty, group)  # before the sum across ranks: counted once
        if self.ranks is not None:
            sum_gradients(self.params.values())
            step_loss, tokens_seen = summed([step_loss, tokens], self.device)
            tokens = int(tokens_seen)
        pos.tokens += tokens
        if self.spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return step_loss

    def _add_penalty(self, ewc: EwcPenalty, group: list[list[Encoded]]) -> None:
        """The EWC term's gradient, once per optimizer step, whatever grad_accum is."""
        penalty = ewc()
        self.pos.penalty = penalty.item()
        if not math.isfinite(self.pos.penalty):
            weights = [e.weight for chunk in group for e in chunk]
            tasks = [e.task for chunk in group for e in chunk]
            raise NonFiniteLoss(self.pos.step + 1, self.pos.penalty, weights, tasks, "EWC penalty")
        penalty.backward()

    # --- save, cleanup

    def save_checkpoint(self, checkpoint_dir: Path) -> Path:
        if not self.leader:
            return checkpoint_dir  # rank 0 writes it; every rank holds the same state
        return save_checkpoint(
            checkpoint_dir,
            self.run_id,
            self.params,
            self.optimizer,
            self.scheduler,
            self.device,
            asdict(self.pos),
        )

    def load_checkpoint(self, checkpoint_dir: Path) -> bool:
        state = load_checkpoint(
            checkpoint_dir, self.run_id, self.params, self.optimizer, self.scheduler, self.device
        )
        if state is None:
            return False
        self.pos = _Position(**state)
        return True

    def cleanup(self) -> None:
        """Remove the adapter (unmerged) and restore the base parameters' flags."""
        if self.peft_model is not None:
            detach_adapter(self.peft_model, self._requires_grad)
            self.peft_model = None
        self.fisher = self.penalty = None

    def result(self, adapter_dir: Path) -> TrainResult:
        pos = self.pos
        return TrainResult(
            adapter_dir=adapter_dir,
            steps=pos.step,
            new_examples=len(self.new),
            replay_examples=len(self.pool),
            loss_first=pos.loss_first,
            loss_last=pos.loss_last,
            tokens_per_s=pos.tokens / pos.seconds if pos.seconds > 0 else 0.0,
            fisher_seconds=self.fisher_seconds,
            train_seconds=pos.seconds,
            truncated=self.truncated,
            resumed_from_step=self.resumed_from,
            ewc_penalty_last=pos.penalty,
            adapted_modules=self.adapted,
        )


def _run_id(
    new: Sequence[ExampleLike],
    pool: Sequence[ExampleLike],
    train: TrainSpec,
    lora: LoraSpec,
    replay_spec: ReplaySpec,
    ewc: EwcSpec | None,
) -> str:
    """What a checkpoint must match to be resumed: the data and every setting that shapes it."""
    settings = asdict(train)
    for volatile in ("progress", "checkpoint_every", "device", "processes", "max_seconds"):
        settings.pop(volatile)
    settings["template"] = [train.template.with_input, train.template.without_input]
    blob: dict[str, Any] = {"train": settings, "lora": asdict(lora), "replay": asdict(replay_spec)}
    blob["ewc"] = asdict(ewc) if ewc else None
    h = hashlib.sha256(json.dumps(blob, sort_keys=True).encode())
    for group in (new, pool):
        h.update(b"\x00group")
        for ex in group:
            weight = str(getattr(ex, "weight", 1.0))
            for part in (ex.task, ex.instruction, ex.input, ex.output, weight):
                h.update(part.encode() + b"\x1f")
    return h.hexdigest()
