"""Build the embedded base model: byte-level tokenizer, tiny Llama, full-parameter pretraining.

`build_embedded_base` reproduces `learners/embedded/tiny/` from a seed: it trains on the
synthetic curriculum (`aftertune.learners.curriculum`) with the loss on response tokens only,
measures per-task greedy accuracy on a held-out draw, and writes the model directory
atomically together with a BUILD.md that records how it was made.

    python -m aftertune.learners.pretrain --out DIR --steps 8000 --seed 0 --device cpu \
        --batch-size 32 --lr 0.003 --threads 2      # the shipped build (see its BUILD.md)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from aftertune.learners import curriculum
from aftertune.learners.base_model import resolve_device
from aftertune.learners.curriculum import Example
from aftertune.learners.data import IGNORE_INDEX, Encoded, collate
from aftertune.learners.generate import CausalLM, greedy_answers
from aftertune.store.files import staged_dir

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b has token id b + 3
VOCAB_SIZE = BYTE_OFFSET + 256
MAX_POSITIONS = 512
_WARMUP = 100  # steps of linear learning-rate warmup
_CALIBRATE = 40  # step at which a time budget measures speed and fixes the step count


@dataclass(frozen=True)
class TinyArchitecture:
    """Shape of the embedded model: ~0.92M parameters, so LoRA steps on 2 CPU cores stay fast."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4


@dataclass
class BuildReport:
    """What `build_embedded_base` did; also rendered into BUILD.md."""

    out_dir: str
    command: str
    seed: int
    steps: int
    batch_size: int
    learning_rate: float
    device: str
    parameters: int
    wall_seconds: float
    final_loss: float
    task_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.task_accuracy.values()) / max(len(self.task_accuracy), 1)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, so every byte is a visible token."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens, no merges, three specials: any UTF-8 text round-trips exactly.

    A BPE model with an empty merge list keeps the tokenizer.json in the GPT-2 layout that
    onnxruntime-genai's tokenizer also reads. No BOS is added: prompts always start with the
    template, and adding nothing keeps HF and ORT tokenisation identical.
    """
    vocab = {PAD: PAD_ID, BOS: BOS_ID, EOS: EOS_ID}
    vocab.update({ch: b + BYTE_OFFSET for b, ch in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,  # the default would eat spaces before punctuation
        model_max_length=MAX_POSITIONS,
    )


def tiny_config(arch: TinyArchitecture = TinyArchitecture()) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        # Untied: fewer surprises in safetensors, LoRA merges and the ONNX builder, for 33k params.
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def encode(text: str) -> list[int]:
    """Token ids of `text` under `byte_tokenizer()`, computed directly (the tokenizer is 25x slower)."""
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def encode_curriculum(example: Example) -> Encoded:
    """A curriculum example as training ids (byte tokens), the loss on response + EOS only."""
    prompt = encode(example.prompt)
    response = [*encode(example.output), EOS_ID]
    return Encoded(
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
        weight=1.0,
        task=example.task,
        prompt_truncated=False,
        response_truncated=False,
    )


def curriculum_accuracy(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers, per curriculum task."""
    answers = greedy_answers(model, tokenizer, [e.prompt for e in examples])
    hits: dict[str, list[bool]] = defaultdict(list)
    for e, a in zip(examples, answers, strict=True):
        hits[e.task].append(a == e.output)
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10 % of peak.

    Hand-written, unlike the recipe's schedule: a time budget cuts `steps` mid-run (a
    scheduler fixes its total up front), and transformers' warmup starts at 0, not at
    peak/warmup, which would change the bits of the shipped build.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def build_embedded_base(
    out_dir: Path,
    *,
    steps: int,
    seed: int,
    device: str = "auto",
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    eval_per_task: int = 50,
    time_budget_s: float | None = None,
    progress: bool = True,
) -> BuildReport:
    """Pretrain the embedded tiny model from scratch and write it to `out_dir` atomically.

    With `time_budget_s`, the step count is cut (once, early) to fit the budget; the report
    records the steps actually run, which reproduce the same weights without a budget.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    model = LlamaForCausalLM(tiny_config()).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("pretraining %d-parameter model on %s for %d steps", n_params, dev, steps)
    opt = _optimizer(model, learning_rate)
    started = time.monotonic()
    run = _pretrain(
        model,
        opt,
        curriculum.stream(seed),
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        time_budget_s=time_budget_s,
        progress=progress,
    )
    model.eval()
    accuracy = curriculum_accuracy(model, tokenizer, curriculum.held_out(seed, eval_per_task))
    report = BuildReport(
        out_dir=str(out_dir),
        command=_build_command(out_dir, run.steps, seed, device, batch_size, learning_rate, dev),
        seed=seed,
        steps=run.steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        device=str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        parameters=n_params,
        wall_seconds=round(time.monotonic() - started, 1),
        final_loss=round(run.ema_loss, 4),
        task_accuracy={k: round(v, 3) for k, v in accuracy.items()},
    )
    _write_model_dir(out_dir, model.cpu(), tokenizer, report)
    logger.info("wrote %s: mean curriculum accuracy %.3f", out_dir, report.mean_accuracy)
    return report


def _optimizer(model: LlamaForCausalLM, learning_rate: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.95),
    )


@dataclass(frozen=True)
class _Run:
    steps: int  # steps actually run (a time budget may cut them)
    ema_loss: float  # smoothed training loss on response tokens at the end


def _pretrain(
    model: LlamaForCausalLM,
    opt: torch.optim.Optimizer,
    data: Iterator[Example],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    time_budget_s: float | None,
    progress: bool,
) -> _Run:
    """The training loop: full-parameter steps on response-only loss, clipped at norm 1."""
    dev = next(model.parameters()).device
    # Fixed warmup, so a time budget can settle the step count (at step _CALIBRATE) without
    # changing any learning rate already used: `--steps N` then reproduces the run exactly.
    warmup = min(_WARMUP, steps)
    started = time.monotonic()
    ema_loss = float("nan")
    model.train()
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, mininterval=2.0)
    for step in bar:
        if time_budget_s is not None and step == _CALIBRATE:
            steps = _affordable_steps(steps, step, time.monotonic() - started, time_budget_s)
            bar.total = steps
        if step >= steps:
            break
        batch = collate([encode_curriculum(e) for e in itertools.islice(data, batch_size)], PAD_ID)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, learning_rate, warmup)
        loss = model(
            input_ids=batch["input_ids"].to(dev),
            attention_mask=batch["attention_mask"].to(dev),
            labels=batch["labels"].to(dev),
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            # Syncing every step would stall a GPU; a smoothed loss every 25 steps is enough.
            value = loss.item()
            ema_loss = value if math.isnan(ema_loss) else 0.8 * ema_loss + 0.2 * value
            bar.set_postfix(loss=f"{ema_loss:.3f}")
    return _Run(steps=steps, ema_loss=ema_loss)


def _affordable_steps(steps: int, done: int, elapsed_s: float, budget_s: float) -> int:
    """The step count that fits ``budget_s`` at the speed of the first ``done`` steps."""
    per_step = elapsed_s / done
    affordable = done + int((budget_s - elapsed_s) / per_step)
    steps = min(steps, max(_WARMUP, affordable))
    logger.info("time budget %.0f s: %.2f s/step, training %d steps", budget_s, per_step, steps)
    return steps


def _build_command(
    out_dir: Path,
    steps: int,
    seed: int,
    device: str,
    batch_size: int,
    learning_rate: float,
    dev: torch.device,
) -> str:
    """The command line that rebuilds these weights, for BUILD.md."""
    return (
        f"python -m aftertune.learners.pretrain --out {_display_path(out_dir)}"
        f" --steps {steps} --seed {seed} --device {device} --batch-size {batch_size} --lr {learning_rate}"
        # CPU float sums depend on the thread count; record it so the rebuild is bit-exact.
        + (f" --threads {torch.get_num_threads()}" if dev.type == "cpu" else "")
    )


def _display_path(path: Path) -> str:
    """`path` relative to the working directory when inside it, so BUILD.md is portable."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _write_model_dir(
    out_dir: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, report: BuildReport
) -> None:
    """Save into a sibling temp dir, then swap it in, so readers never see a half-written model."""
    with staged_dir(out_dir) as tmp:
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "BUILD.md").write_text(render_build_md(report), encoding="utf-8")
        (tmp / "build_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        for path in tmp.iterdir():
            path.chmod(0o644)  # the temp files are private; the shipped model is world-readable
        tmp.chmod(0o755)


def render_build_md(report: BuildReport) -> str:
    rows = "\n".join(f"| {task} | {acc:.3f} |" for task, acc in report.task_accuracy.items())
    return f"""# embedded:tiny — how these weights were built

Reproduce with:

```
{report.command}
```

| | |
|---|---|
| seed | {report.seed} |
| steps | {report.steps} (batch {report.batch_size}, peak lr {report.learning_rate}) |
| device | {report.device} |
| wall time | {report.wall_seconds} s (training + evaluation) |
| parameters | {report.parameters:,} |
| final training loss (EMA, response tokens) | {report.final_loss} |
| mean held-out greedy accuracy | {report.mean_accuracy:.3f} |

Per-task exact-match accuracy of greedy answers on a held-out draw of the curriculum
(`curriculum.held_out(seed, per_task)`):

| task | accuracy |
|---|---|
{rows}
"""


# How the shipped weights in embedded/tiny were built (see embedded/tiny/BUILD.md), on CPU
# with two torch threads: the thread count changes float reduction order and so the bits.
SHIPPED_BUILD: dict[str, float | int] = {
    "steps": 8000,
    "seed": 0,
    "batch_size": 32,
    "learning_rate": 3e-3,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the embedded tiny base model.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-per-task", type=int, default=50)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; cuts --steps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = build_embedded_base(
        args.out,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        eval_per_task=args.eval_per_task,
        time_budget_s=args.time_budget,
    )
    print(render_build_md(report))


if __name__ == "__main__":
    main()
