"""The learner on CUDA: two LoRA cycles (bf16 autocast) with replay and EWC, judged on CPU.

A short, prepared check for a machine with a GPU (the project's tests run on CPU only). It
trains the embedded tiny base on ``parity``, merges the adapter, then trains ``last_digit``
on that champion with parity replayed and an EWC penalty whose Fisher is estimated on the
GPU, merges again, and scores both tasks on CPU in fp32 with greedy decoding — the path a
GPU-trained champion takes to export. It prints losses, tokens/s and accuracies.

Settings are the daemon's defaults (``Settings()``, so ``AFTERTUNE_*`` variables apply),
except the flags: ``--steps`` per cycle and ``--device``.

Runs from a checkout without installing it (a shim maps ``aftertune.*`` onto the folders),
so a GPU host needs only torch, transformers, peft, safetensors, tqdm and pydantic-settings.

    python bench/gpu_check.py [--device cuda] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _shim() -> None:
    try:
        import aftertune.learners  # noqa: F401  installed: nothing to do
    except ImportError:
        root = Path(tempfile.mkdtemp(prefix="aftertune-shim-"))
        (root / "aftertune").mkdir()
        for name in ("learners", "store", "daemon"):
            os.symlink(REPO / name, root / "aftertune" / name)
        sys.path.insert(0, str(root))


@dataclass(frozen=True)
class Ex:
    task: str
    instruction: str
    input: str
    output: str


def make(task: str, numbers: list[int]) -> list[Ex]:
    if task == "parity":
        return [
            Ex(task, "Is the number even or odd?", str(n), "even" if n % 2 == 0 else "odd")
            for n in numbers
        ]
    return [Ex(task, "What is the last digit of the number?", str(n), str(n % 10)) for n in numbers]


def accuracy(model: object, tokenizer: object, examples: list[Ex], template: Any) -> float:
    import torch

    right = 0
    with torch.no_grad():
        for ex in examples:
            enc = tokenizer(template.render(ex.instruction, ex.input), return_tensors="pt")  # type: ignore[operator]
            out = model.generate(  # type: ignore[attr-defined]
                **enc,
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
            )
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]
            right += text.strip() == ex.output
    return 100.0 * right / len(examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    _shim()
    import torch
    from peft import PeftModel

    from aftertune.daemon.settings import Settings
    from aftertune.daemon.specs import specs_from
    from aftertune.learners.base_model import load_base
    from aftertune.learners.kinds.generative.objective import ResponseObjective
    from aftertune.learners.recipe import TrainJob, train_adapter

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA device here")
            return 1
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    pool = random.Random(0).sample(range(100_000), 1600)
    tasks = {
        "parity": (make("parity", pool[:600]), make("parity", pool[600:800])),
        "last_digit": (make("last_digit", pool[800:1400]), make("last_digit", pool[1400:])),
    }
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    specs = specs_from(Settings())
    model, tokenizer = load_base(specs.base, device="cpu", dtype=torch.float32)
    train_spec = replace(specs.train, max_steps=args.steps, device=args.device, progress=False)
    seen: list[Ex] = []
    for cycle, (task, (train, _)) in enumerate(tasks.items(), start=1):
        t0 = time.monotonic()
        job = TrainJob.of(
            train,
            seen,
            train=train_spec,
            lora=specs.lora,
            replay=specs.replay,
            ewc=specs.ewc,
            fisher_path=work / "fisher.safetensors",
            out_dir=work / f"adapter{cycle}",
        )
        result = train_adapter(model, tokenizer, job, objective=ResponseObjective(tokenizer))
        model = model.to("cpu").float()
        model = PeftModel.from_pretrained(model, str(result.adapter_dir)).merge_and_unload()
        model.eval()
        seen += train
        scores = ", ".join(
            f"{t} {accuracy(model, tokenizer, test, specs.eval.template):.1f}%"
            for t, (_, test) in tasks.items()
        )
        print(
            f"cycle {cycle} ({task}): {result.steps} steps, loss {result.loss_first:.3f} -> "
            f"{result.loss_last:.3f}, {result.tokens_per_s:.0f} tok/s, fisher "
            f"{result.fisher_seconds:.1f}s, train {result.train_seconds:.1f}s, wall "
            f"{time.monotonic() - t0:.1f}s | CPU fp32 greedy: {scores}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
