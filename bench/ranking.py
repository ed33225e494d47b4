"""The ranking kind on real tasks: against SetFit, the cost of a cycle, consumer speed.

Three parts, each optional, all in one process so the ratios compare like with like:

- ``--peer``: per task, the majority share, zero-shot accuracy (nearest answer text), the
  floor (the frozen encoder's class prototypes from every train record) and aftertune's
  ranking kind (MiniLM + LoRA, the daemon's settings for the kind: contrastive against the
  task's prototypes) against SetFit (the same MiniLM, full
  fine-tuning on sentence pairs + a logistic-regression head; PyPI ``setfit``, which needs
  ``datasets`` and so ``pyarrow<21`` here) on the same train examples: held-out accuracy and
  training seconds, side by side. The peer runs only when ``setfit`` imports.
- ``--cycle``: one real ``run_cycle`` (train → evaluate → gate → export + parity + publish)
  on the first task's train and test records, in a temporary state dir: seconds per phase.
- ``--consumer``: answers per second on the first task's test prompts, the published ONNX
  bundle (``Bundle.answer_many``, 32 prompts per ONNX call grouped by length, as
  ``rank`` groups them) against PyTorch (``ranking.rank``).

    python bench/ranking.py --tasks agnews,sni_emotion \\
        --train 300 --test 200 --peer --cycle --consumer --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from aftertune.daemon.settings import load_settings
from aftertune.daemon.specs import specs_from
from aftertune.learners.base_model import EMBEDDED_MINILM, load_base, resolve_base
from aftertune.learners.specs import LearningSpecs

log = logging.getLogger("bench.ranking")

# The real-task samples shipped with the repository (see data/README.md).
DATA = Path(__file__).resolve().parent / "data"


def _read(data: Path, task: str, split: str, n: int, skip: int = 0) -> list[dict[str, Any]]:
    """Records ``skip`` to ``skip + n`` of ``<task>.<split>.jsonl``."""
    lines = (data / f"{task}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][skip : skip + n]


class _Ex:
    def __init__(self, row: dict[str, Any], split: str = "train") -> None:
        self.task, self.instruction = row["task"], row["instruction"]
        self.input, self.output, self.split = row.get("input", ""), row["output"], split
        self.weight = 1.0


def _accuracy(
    model: Any,
    tokenizer: Any,
    test: list[dict[str, Any]],
    specs: LearningSpecs,
    candidates: Sequence[str],
) -> float:
    """Held-out accuracy of the nearest anchor (prototypes where ``candidates`` carry
    exemplars, else the answer texts), the daemon's scoring rule."""
    from aftertune.learners.kinds.ranking.encoder import rank

    prompts = [specs.train.template.render(r["instruction"], r.get("input", "")) for r in test]
    sims = rank(model, tokenizer, prompts, candidates, max_length=specs.train.max_length)
    picks = [candidates[i] for i in sims.argmax(1).tolist()]
    return sum(p == r["output"] for p, r in zip(picks, test, strict=True)) / len(test)


def _majority(test: list[dict[str, Any]]) -> float:
    return Counter(r["output"] for r in test).most_common(1)[0][1] / len(test)


def aftertune_task(
    specs: LearningSpecs, train: list[dict[str, Any]], test: list[dict[str, Any]]
) -> dict[str, float]:
    """Zero-shot (answer texts) and floor (frozen prototypes of every train record) accuracy,
    one cycle's adapter, accuracy after (the daemon's answer sets); seconds of training."""
    from peft import PeftModel

    from aftertune.learners.kinds import kind_for
    from aftertune.learners.kinds.ranking.candidates import answer_set, candidates_of
    from aftertune.learners.recipe import TrainJob, train_adapter

    task = train[0]["task"]
    answers = candidates_of([r["output"] for r in train], specs.ranking.max_candidates) or []
    examples = [_Ex(r) for r in train]
    # As ``Ranking.answer_sets`` draws them: ranking.exemplars prompts per answer, seeded
    k = specs.ranking.exemplars * len(answers)
    drawn = random.Random(f"exemplars:{task}").sample(examples, min(len(examples), k))
    candidates = answer_set(answers, drawn, specs.train.template)
    model, tokenizer = load_base(specs.base)
    zero_shot = _accuracy(model, tokenizer, test, specs, answers)
    floor = _accuracy(
        model, tokenizer, test, specs, answer_set(answers, examples, specs.train.template)
    )
    objective = kind_for(specs.base).objective(tokenizer, {task: candidates}, specs)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        job = TrainJob.of(
            examples,
            [],
            train=replace(specs.train, progress=False, checkpoint_every=0),
            lora=specs.lora,
            replay=replace(specs.replay, enabled=False),
            ewc=None,
            out_dir=Path(tmp) / "adapter",
        )
        result = train_adapter(model, tokenizer, job, objective=objective)
        seconds = time.perf_counter() - started
        merged = PeftModel.from_pretrained(model, str(result.adapter_dir)).merge_and_unload()
    after = _accuracy(merged, tokenizer, test, specs, candidates)
    return {
        "majority": _majority(test),
        "zero_shot": zero_shot,
        "floor": floor,
        "accuracy": after,
        "train_s": seconds,
        "steps": result.steps,
    }


def setfit_task(
    train: list[dict[str, Any]], test: list[dict[str, Any]], iterations: int
) -> dict[str, float]:
    """SetFit (batch 16, one epoch over ``iterations`` x 2 generated pairs per example; its
    default, every pair, is ~4,200 steps for 300 examples) on the same data."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    model = SetFitModel.from_pretrained(str(resolve_base(EMBEDDED_MINILM)), local_files_only=True)
    data = Dataset.from_dict(
        {"text": [r["input"] for r in train], "label": [r["output"] for r in train]}
    )
    with tempfile.TemporaryDirectory() as tmp:  # SetFit writes checkpoints to output_dir
        args = TrainingArguments(
            output_dir=tmp, batch_size=16, num_epochs=1, num_iterations=iterations
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    picks = model.predict([r["input"] for r in test])
    accuracy = sum(str(p) == r["output"] for p, r in zip(picks, test, strict=True)) / len(test)
    return {"accuracy": accuracy, "train_s": seconds}


def peer(
    specs: LearningSpecs,
    data: Path,
    tasks: list[str],
    n_train: int,
    n_test: int,
    iterations: int = 5,
    more_test: int = 0,
) -> dict[str, Any]:
    try:
        import setfit  # noqa: F401
    except ImportError:
        setfit_ok = False
        log.warning(
            "setfit is not installed: the peer side is skipped (pip install setfit 'pyarrow<21')"
        )
    else:
        setfit_ok = True
    out: dict[str, Any] = {}
    for task in tasks:
        train, test = _read(data, task, "train", n_train), _read(data, task, "test", n_test)
        # Train records past the first n_train, never trained on, held out as well: a
        # 200-record test alone has a standard error of about 3 points.
        test += _read(data, task, "train", more_test, skip=n_train)
        row: dict[str, Any] = {"aftertune": aftertune_task(specs, train, test)}
        print(f"{task} aftertune: {json.dumps(row['aftertune'])}", flush=True)
        if setfit_ok:
            row["setfit"] = setfit_task(train, test, iterations)
            row["time_ratio"] = row["aftertune"]["train_s"] / row["setfit"]["train_s"]
            row["accuracy_gap"] = row["aftertune"]["accuracy"] - row["setfit"]["accuracy"]
        out[task] = row
        print(f"{task}: {json.dumps(row)}", flush=True)
    print(_table(out), flush=True)
    return out


def _table(rows: dict[str, Any]) -> str:
    """The per-task figures as the markdown table docs/benchmarks.md keeps."""
    lines = [
        "| task | majority | zero-shot | floor | aftertune | train s | SetFit | SetFit s"
        " | time ratio | gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, row in rows.items():
        a, peer = row["aftertune"], row.get("setfit")
        ours = [a["majority"], a["zero_shot"], a["floor"], a["accuracy"]]
        cells = [f"{100 * x:.1f} %" for x in ours] + [f"{a['train_s']:.1f}"]
        if peer:
            cells += [f"{100 * peer['accuracy']:.1f} %", f"{peer['train_s']:.1f}"]
            cells += [f"{row['time_ratio']:.2f}x", f"{100 * row['accuracy_gap']:+.1f}"]
        else:
            cells += ["–"] * 4
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cycle(specs: LearningSpecs, data: Path, task: str, n_train: int, n_test: int) -> dict[str, Any]:
    """One real cycle on ``task`` in a temporary state dir; seconds per phase."""
    from aftertune.learners.cycle import run_cycle
    from aftertune.learners.learning_state import LearningState
    from aftertune.store.examples import ExampleStore
    from aftertune.store.records import record_from_obj
    from aftertune.store.registry import Registry

    rows = [{**r, "split": "train"} for r in _read(data, task, "train", n_train)]
    rows += [{**r, "split": "test"} for r in _read(data, task, "test", n_test)]
    state = Path(tempfile.mkdtemp(prefix="bench-ranking-"))
    with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:
        store.add([record_from_obj(r) for r in rows])
        started = time.perf_counter()
        result = run_cycle(LearningState(store, registry, state, specs, actor="bench"))
        total = time.perf_counter() - started
    out = {
        "state_dir": str(state),
        "decision": result.decision.value,
        "total_s": total,
        **result.timings,
    }
    out["metrics"] = {t: m["challenger"] for t, m in result.metrics.items()}
    print(f"cycle: {json.dumps(out)}", flush=True)
    return out


def consumer(
    specs: LearningSpecs, state: Path, data: Path, task: str, n_test: int
) -> dict[str, Any]:
    """Answers per second: the published bundle (ONNX Runtime) vs PyTorch on the same prompts."""
    from aftertune.learners.champion import load_version
    from aftertune.learners.kinds.ranking.candidates import load_exemplars, with_exemplars
    from aftertune.learners.kinds.ranking.encoder import rank
    from aftertune.store.consumer import Bundle
    from aftertune.store.registry import Registry

    test = _read(data, task, "test", n_test)
    bundle = Bundle.open(state / "bundles" / "latest")
    records = [(task, r["instruction"], r.get("input", "")) for r in test]
    started = time.perf_counter()
    answers = bundle.answer_many(records, batch_size=32)  # grouped by length, as rank() does
    onnx_s = time.perf_counter() - started
    with Registry(state) as registry:
        champion = registry.champion()
        model, tokenizer = load_version(registry, specs.base, state, champion)
        adapter_dir = champion.adapter_dir if champion is not None else None
    # the candidates with the exemplars the bundle's anchors were built from
    candidates = bundle.candidates[task]
    if adapter_dir is not None:
        candidates = with_exemplars({task: candidates}, load_exemplars(adapter_dir))[task]
    prompts = [bundle.render(i, x) for _, i, x in records]
    started = time.perf_counter()
    sims = rank(model, tokenizer, prompts, candidates, max_length=specs.train.max_length)
    torch_s = time.perf_counter() - started
    same = sum(
        bundle.candidates[task][j] == a
        for j, a in zip(sims.argmax(1).tolist(), answers, strict=True)
    )
    out = {
        "prompts": len(records),
        "onnx_per_s": len(records) / onnx_s,
        "torch_per_s": len(records) / torch_s,
        "ratio": torch_s / onnx_s,
        "same_answers": same,
    }
    print(f"consumer: {json.dumps(out)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=DATA, help="folder of <task>.train/.test.jsonl (bench/data)"
    )
    p.add_argument("--tasks", default="agnews,sni_emotion", help="comma-separated")
    p.add_argument("--train", type=int, default=300, help="train examples per task")
    p.add_argument("--test", type=int, default=200, help="test examples per task")
    p.add_argument("--peer", action="store_true", help="aftertune vs SetFit per task")
    p.add_argument(
        "--more-test",
        type=int,
        default=0,
        help="--peer also tests on up to this many train records after the first --train "
        "(never trained on; the full task files are needed: --data ../shared/datasets)",
    )
    p.add_argument("--cycle", action="store_true", help="one real cycle on the first task")
    p.add_argument("--consumer", action="store_true", help="bundle vs PyTorch answers/s")
    p.add_argument(
        "--state", type=Path, help="--consumer on this state dir's latest bundle (no cycle)"
    )
    p.add_argument("--setfit-iterations", type=int, default=5, help="SetFit pairs per example / 2")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    settings = load_settings()
    settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"base": EMBEDDED_MINILM})}
    )
    specs = specs_from(settings)
    tasks = [t for t in args.tasks.split(",") if t]
    out: dict[str, Any] = {"threads": args.threads, "train": args.train, "test": args.test}
    out["more_test"] = args.more_test
    if args.peer:
        out["peer"] = peer(
            specs, args.data, tasks, args.train, args.test, args.setfit_iterations, args.more_test
        )
    if args.cycle or (args.consumer and args.state is None):
        out["cycle"] = cycle(specs, args.data, tasks[0], args.train, args.test)
    if args.consumer:
        state = args.state or Path(out["cycle"]["state_dir"])
        out["consumer"] = consumer(specs, state, args.data, tasks[0], args.test)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
