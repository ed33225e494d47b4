"""A label task through the product's own path, as a user runs it: push, cycle, pull, answer.

For each task, in a fresh state dir with its own embedded Redis, the CLI alone:

1. ``aftertune push`` the first ``--train`` train records and ``--test`` test records (the
   gate's held-out set), then ``aftertune serve --burst`` stores them;
2. ``aftertune cycle --json`` trains a version on the base and gates it (timed);
3. ``aftertune pull`` installs the published bundle (verified);
4. ``aftertune generate --jsonl`` answers the held-out records: the ``--test`` test records
   plus ``--more-test`` train records past the first ``--train`` (never pushed), with ONNX
   Runtime; the accuracy is counted here against their labels.

It prints one line per task (decision, accuracy, cycle seconds) and a table; ``--json`` writes
the figures. The settings are the shipped defaults for ``--base`` plus whatever
``AFTERTUNE_*`` says, exactly as for the daemon::

    .venv/bin/python bench/product.py --tasks sni_sst2,amazon --train 300 --test 200 \\
        --more-test 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"


def _read(data: Path, task: str, split: str, n: int, skip: int = 0) -> list[dict[str, Any]]:
    lines = (data / f"{task}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][skip : skip + n]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _cli(env: dict[str, str], *args: str, timeout: float = 3600) -> str:
    """``aftertune ARGS`` in ``env``; its stdout. A failure stops the run with its stderr."""
    exe = Path(sys.executable).with_name("aftertune")
    done = subprocess.run(
        [str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode not in (0, 3):  # 3: the cycle rejected the version (reported, not fatal)
        raise SystemExit(f"aftertune {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def run_task(
    base: str, data: Path, task: str, n_train: int, n_test: int, more_test: int
) -> dict[str, Any]:
    train = [{**r, "split": "train"} for r in _read(data, task, "train", n_train)]
    test = [{**r, "split": "test"} for r in _read(data, task, "test", n_test)]
    held_out = _read(data, task, "test", n_test) + _read(data, task, "train", more_test, n_train)
    with tempfile.TemporaryDirectory(prefix="bench-product-") as tmp:
        root = Path(tmp)
        env = {
            **os.environ,
            "AFTERTUNE_STATE_DIR": str(root / "state"),
            "AFTERTUNE_MODEL__BASE": base,
            "AFTERTUNE_REDIS__STREAM": f"bench-product-{task}",
        }
        _cli(env, "push", str(_write(root / "records.jsonl", train + test)))
        _cli(env, "serve", "--burst")
        started = time.perf_counter()
        cycle = json.loads(_cli(env, "cycle", "--json"))
        cycle_s = time.perf_counter() - started
        out: dict[str, Any] = {
            "decision": cycle["decision"],
            "cycle_s": cycle_s,
            "held_out": len(held_out),
            "phases": cycle.get("timings", {}),  # train (Fisher included), evaluate, publish
        }
        if cycle["decision"] != "promoted":
            out["reasons"] = cycle.get("reasons")
            return out
        _cli(env, "pull", "--from", str(root / "state"), "--to", str(root / "consumer"))
        requests = [
            {"task": task, "instruction": r["instruction"], "input": r.get("input", ""), "id": i}
            for i, r in enumerate(held_out)
        ]
        answered = _cli(
            env,
            "generate",
            "--bundle",
            str(root / "consumer" / "current"),
            "--jsonl",
            str(_write(root / "requests.jsonl", requests)),
        )
        answers = {a["id"]: a["answer"] for a in map(json.loads, answered.splitlines())}
        right = sum(answers.get(i) == r["output"].strip() for i, r in enumerate(held_out))
        out["accuracy"] = right / len(held_out)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Label tasks through push, cycle, pull and generate --jsonl, as a user"
        " runs them: accuracy on held-out records and the cycle's seconds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=DATA, help="dir of <task>.<split>.jsonl")
    p.add_argument("--tasks", default="sni_sst2", help="comma-separated")
    p.add_argument("--base", default="embedded:minilm", help="model.base")
    p.add_argument("--train", type=int, default=300, help="train records pushed per task")
    p.add_argument("--test", type=int, default=200, help="test records pushed (gate) per task")
    p.add_argument(
        "--more-test",
        type=int,
        default=0,
        help="train records past --train, never pushed, answered as held-out too",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    rows: dict[str, Any] = {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        rows[task] = run_task(args.base, args.data, task, args.train, args.test, args.more_test)
        print(f"{task}: {json.dumps(rows[task])}", flush=True)
    print("| task | decision | held out | accuracy | cycle s |")
    print("|---|---|---:|---:|---:|")
    for task, r in rows.items():
        acc = f"{100 * r['accuracy']:.1f} %" if "accuracy" in r else "–"
        print(f"| {task} | {r['decision']} | {r['held_out']} | {acc} | {r['cycle_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
