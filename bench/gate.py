"""Gate benchmark: clean cycles should be promoted, poisoned cycles rejected.

    .venv/bin/python bench/gate.py [--data DIR] [--tasks t1,t2,...] [--k 4] [--train N]
        [--steps S] [--poison flip|shuffle|both] [--base BASE] [--threads 1] [--json FILE]

Real tasks on the ranking kind (MiniLM):

    .venv/bin/python bench/gate.py --base embedded:minilm \
        --tasks agnews,sni_emotion,dbpedia --k 2 --train 160 --poison flip

A champion first learns the first task. Then, alternately, a clean batch (the next task, or
more data of a known one once all are known) and a poisoned batch (a known task's labels
flipped to another label, or shuffled) arrive, and one full cycle (train → evaluate → gate)
runs for each, with the default gate thresholds. Prints the promotion rate of clean cycles
and the rejection rate of poisoned ones. Targets: 100 % of poisoned cycles rejected and
≥ 95 % of clean cycles promoted.

Every setting is the daemon's (``load_settings()``: the shipped defaults, ``AFTERTUNE_CONFIG``
and the environment), except what the flags change: ``--steps`` per cycle and no export.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from aftertune.daemon.settings import load_settings
from aftertune.daemon.specs import LearningSpecs, specs_from
from aftertune.learners.cycle import run_cycle
from aftertune.learners.errors import DataRejected, NothingToTrain
from aftertune.learners.gate import Decision
from aftertune.learners.learning_state import LearningState
from aftertune.store.examples import ExampleStore
from aftertune.store.records import record_from_obj
from aftertune.store.registry import Registry

# The real-task samples shipped with the repository (see data/README.md).
DATA = Path(__file__).resolve().parent / "data"


def _rows(data: Path, task: str, split: str, start: int, n: int) -> list[dict[str, Any]]:
    path = data / f"{task}.{split}.jsonl"
    if not path.exists():
        sys.exit(f"{path} not found; synthetic tasks: bench/tasks.py --out DIR, then --data DIR")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start : start + n]]


def _poison(rows: list[dict[str, Any]], how: str, rng: random.Random) -> list[dict[str, Any]]:
    labels = sorted({r["output"] for r in rows})
    outputs = [r["output"] for r in rows]
    if how == "shuffle":
        rng.shuffle(outputs)
    else:  # flip: every answer becomes a different label (the next one, cyclically)
        outputs = [labels[(labels.index(o) + 1) % len(labels)] for o in outputs]
    return [{**r, "output": o} for r, o in zip(rows, outputs, strict=True)]


def _push(store: ExampleStore, rows: list[dict[str, Any]]) -> None:
    # Held-out records arrive with the batch (split auto ≈ 10 %) so the gain suite is real.
    store.add(
        [
            record_from_obj({k: r[k] for k in ("task", "instruction", "input", "output")})
            for r in rows
        ]
    )


def gate_specs(daemon: LearningSpecs, steps: int) -> LearningSpecs:
    """The daemon's specs, but ``steps`` per cycle and no export: the gate is what is measured."""
    train = replace(daemon.train, max_steps=steps, progress=False)
    return replace(daemon, train=train, export=None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder of <task>.train.jsonl (bench/data)"
    )
    parser.add_argument("--tasks", default="parity,vowel_end,last_digit,last_letter")
    parser.add_argument("--k", type=int, default=4, help="clean and poisoned cycles each")
    parser.add_argument("--train", type=int, default=300, help="records per batch")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per cycle")
    parser.add_argument("--poison", choices=["flip", "shuffle", "both"], default="both")
    parser.add_argument(
        "--base", default=None, help="model.base for this run (e.g. embedded:minilm on real tasks)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 unless the machine is otherwise idle",
    )
    parser.add_argument("--json", type=Path, default=None)
    return parser


def _print_rates(results: list[dict[str, Any]]) -> None:
    clean_runs = [r for r in results if r["kind"] == "clean"]
    poisoned = [r for r in results if r["kind"].startswith("poisoned")]
    promoted = sum(r["decision"] == "promoted" for r in clean_runs)
    rejected = sum(r["decision"] == "rejected" for r in poisoned)
    print(
        f"clean cycles promoted   : {promoted}/{len(clean_runs)} "
        f"({100 * promoted / max(1, len(clean_runs)):.0f} %)"
    )
    print(
        f"poisoned cycles rejected: {rejected}/{len(poisoned)} "
        f"({100 * rejected / max(1, len(poisoned)):.0f} %)"
    )


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    rng = random.Random(0)
    settings = load_settings()
    if args.base is not None:  # before specs_from: the kind decides unset train.lr/epochs
        model = settings.model.model_copy(update={"base": args.base})
        settings = settings.model_copy(update={"model": model})
    specs = gate_specs(specs_from(settings), args.steps)
    results: list[dict[str, Any]] = []
    offsets = dict.fromkeys(tasks, 0)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:

            def cycle(kind: str, task: str) -> None:
                t0 = time.monotonic()
                try:
                    result = run_cycle(LearningState(store, registry, state, specs))
                    version, decision = result.version, result.decision.value
                    reasons = result.reasons if result.decision is Decision.REJECTED else []
                except DataRejected as exc:  # the data checks, before any training
                    version, decision, reasons = None, "rejected", exc.reasons
                except NothingToTrain as exc:  # e.g. too few held-out records to judge
                    version, decision, reasons = None, "waiting", [str(exc)]
                row = {
                    "kind": kind,
                    "task": task,
                    "version": version,
                    "decision": decision,
                    "reasons": reasons,
                    "seconds": round(time.monotonic() - t0, 1),
                }
                results.append(row)
                print(json.dumps(row), flush=True)

            def clean(task: str) -> None:
                _push(store, _rows(args.data, task, "train", offsets[task], args.train))
                offsets[task] += args.train
                cycle("clean" if results else "setup", task)

            clean(tasks[0])
            known = [tasks[0]]
            pending = tasks[1:]
            modes = ["flip", "shuffle"] if args.poison == "both" else [args.poison]
            for i in range(args.k):
                task = pending.pop(0) if pending else known[i % len(known)]
                clean(task)
                if task not in known and results[-1]["decision"] == "promoted":
                    known.append(task)
                victim = known[i % len(known)]
                how = modes[i % len(modes)]
                rows = _rows(args.data, victim, "train", offsets[victim], args.train)
                offsets[victim] += args.train
                _push(store, _poison(rows, how, rng))
                cycle(f"poisoned-{how}", victim)
    _print_rates(results)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "cycles": results}, indent=2))


if __name__ == "__main__":
    main()
