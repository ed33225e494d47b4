"""The whole loop's latency: XADD of 500 new records → a verified bundle pulled over HTTP.

Runs the real daemon (``aftertune serve``: embedded Redis, the shipped tiny base, default
training settings) in a fresh state dir, pushes 500 records of a learnable task at t0, and
times each phase until ``aftertune pull`` has verified the new bundle; then again with 500
records of a second task, on that champion (replay, EWC, two tasks to gate):

    ingest    t0 → all 500 records in the store
    schedule  → the cycle starts (cycle.check_every_s)
    train     the training report's seconds (loading, replay sampling, Fisher, steps)
    gate      evaluation of champion and challenger on every held-out suite
    export    export + parity check + promotion + `latest` (the aftertune_export metric)
    pull      HTTP download + sha256 verification

Target (issue 6): ≤ 90 s on the 2-core reference machine.

    python bench/loop.py [--records 500] [--state-dir .aftertune] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import urllib.request
from pathlib import Path

from aftertune.daemon.demo import Demo
from aftertune.daemon.settings import load_settings
from aftertune.store.consumer.pull import HttpSource, pull
from aftertune.store.examples import ExampleStore
from aftertune.store.registry import Registry

TARGET_S = 90.0


def records(n: int, task: str, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct records (no duplicate ids) of a learnable task: parity or last_digit."""
    out = []
    for number in random.Random(seed).sample(range(100_000), n):
        if task == "parity":
            instruction, answer = "Is the number even or odd?", ("odd", "even")[number % 2 == 0]
        else:
            instruction, answer = "What is the last digit of the number?", str(number % 10)
        out.append(
            {"task": task, "instruction": instruction, "input": str(number), "output": answer}
        )
    return out


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else None


def measure(demo: Demo, batch: list[dict[str, str]], version: int, before: int) -> dict[str, float]:
    """Push ``batch``; seconds per phase until bundle ``version`` is pulled and verified."""
    t0 = time.monotonic()
    demo.push(batch)

    def stored() -> bool:
        with ExampleStore.in_state_dir(demo.state) as store:
            return store.total() >= before + len(batch)

    demo._wait(stored, "ingest")
    t_ingested = time.monotonic()
    demo._wait(lambda: demo.decided(version), f"the decision on v{version}")
    t_decided = time.monotonic()
    with Registry(demo.state) as registry:
        found = registry.get(version)
        audit = {e.to_state: e.at for e in registry.audit_log(version)}
    if found.state.value != "promoted":
        raise SystemExit(f"v{version} was {found.state.value}: {found.gate.get('reasons')}")
    got = pull(HttpSource(f"http://127.0.0.1:{demo.port}"), demo.state / "consumer")
    t_pulled = time.monotonic()
    if got.version != version:
        raise SystemExit(f"pulled v{got.version}, expected v{version}")
    export_s = metric(demo.port, "aftertune_export_duration_seconds") or 0.0
    train_s = float(found.training.get("train_seconds", 0)) + float(
        found.training.get("fisher_seconds", 0)
    )
    gate_s = audit["promoted"] - audit["evaluating"] - export_s
    return {
        "ingest": t_ingested - t0,
        "schedule+load": (t_decided - t_ingested) - train_s - gate_s - export_s,
        "train": train_s,
        "gate": gate_s,
        "export+publish": export_s,
        "pull+verify": t_pulled - t_decided,
        "total": t_pulled - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--state-dir", type=Path, default=Path(".aftertune"))
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    settings = load_settings(overrides={"state_dir": str(args.state_dir)})
    demo = Demo(settings, args.timeout, name="bench-loop")
    runs: dict[str, dict[str, float]] = {}
    try:
        demo.start_daemon(
            AFTERTUNE_CYCLE__MIN_NEW_EXAMPLES=str(int(args.records * 0.85)),
            AFTERTUNE_CYCLE__CHECK_EVERY_S="0.5",
        )
        first, second = records(args.records, "parity"), records(args.records, "last_digit")
        runs["first cycle (on the base)"] = measure(demo, first, 1, 0)
        runs["next cycle (new task, replay + EWC)"] = measure(demo, second, 2, args.records)
    finally:
        demo.stop_daemon()
    for name, phases in runs.items():
        total = phases["total"]
        print(f"{name}: {args.records} records, XADD -> bundle pulled and verified")
        for phase, seconds in phases.items():
            if phase != "total":
                print(f"  {phase:<15} {seconds:7.1f} s  {100 * seconds / total:5.1f} %")
        verdict = "PASS" if total <= TARGET_S else "MISS"
        print(f"  {'total':<15} {total:7.1f} s   target <= {TARGET_S:.0f} s: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
