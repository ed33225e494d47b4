"""bench/gate.py, ranking.py, product.py and answer_server.py run end to end on small inputs
(a bench that no longer runs is found here, not by the next person measuring): each writes the
JSON it documents, and what it prints agrees with it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DECISIONS = {"promoted", "rejected", "awaiting_approval"}

pytestmark = pytest.mark.slow


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTUNE_")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_gate_bench_runs_a_clean_and_a_poisoned_cycle(tmp_path: Path) -> None:
    data, out = tmp_path / "suite", tmp_path / "gate.json"
    made = _bench("bench/tasks.py", "--out", str(data), "--train", "240", "--test", "20")
    assert made.returncode == 0, made.stderr
    done = _bench(
        "bench/gate.py", "--data", str(data), "--tasks", "parity,vowel_end", "--k", "1",
        "--train", "100", "--steps", "5", "--poison", "flip", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    cycles = report["cycles"]
    assert [c["kind"] for c in cycles] == ["setup", "clean", "poisoned-flip"]
    versions = [c["version"] for c in cycles if c["version"] is not None]
    assert versions == sorted(set(versions))  # each training a new version
    for c in cycles:
        # waiting: a task whose few held-out records cannot be judged yet (no training)
        assert c["decision"] in {*DECISIONS, "waiting"} and c["seconds"] >= 0
        assert bool(c["reasons"]) == (c["decision"] in ("rejected", "waiting")), c
    rejected = sum(c["decision"] == "rejected" for c in cycles[2:])
    assert f"poisoned cycles rejected: {rejected}/1" in done.stdout


def test_ranking_bench_runs_a_cycle_and_the_consumer_answers_as_torch(tmp_path: Path) -> None:
    out = tmp_path / "ranking.json"
    done = _bench(
        "bench/ranking.py", "--data", "daemon/demo_data/real", "--tasks", "agnews",
        "--train", "40", "--test", "24", "--cycle", "--consumer", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    shutil.rmtree(report["cycle"]["state_dir"])
    cycle, consumer = report["cycle"], report["consumer"]
    assert cycle["decision"] in DECISIONS and cycle["metrics"]["agnews"]["n"] == 24
    assert cycle["total_s"] >= cycle["train_s"] > 0
    assert consumer["prompts"] == 24 and consumer["same_answers"] == 24
    assert consumer["ratio"] == pytest.approx(consumer["onnx_per_s"] / consumer["torch_per_s"])
    assert re.search(r'^consumer: \{"prompts": 24', done.stdout, re.M), done.stdout


def test_product_bench_pushes_cycles_pulls_and_answers_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "product.json"
    done = _bench(
        "bench/product.py", "--data", "daemon/demo_data/real", "--tasks", "agnews",
        "--train", "40", "--test", "24", "--more-test", "16", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())["agnews"]
    assert row["decision"] == "promoted", row  # MiniLM's topic prototypes beat chance at once
    assert row["held_out"] == 24 + 16 and row["cycle_s"] > 0
    # answered by the pulled bundle: far above the 25-35 % of one topic
    assert 0.5 < row["accuracy"] <= 1.0
    assert re.search(r"^\| agnews \| promoted \| 40 \| \d+\.\d % \|", done.stdout, re.M)


def test_answer_server_bench_measures_a_widened_base_and_its_swaps(tmp_path: Path) -> None:
    out = tmp_path / "answer.json"
    done = _bench(
        "bench/answer_server.py", "--kind", "generative", "--scale", "2", "--seconds", "0.5",
        "--swaps", "2", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["bundle_format"] == "onnxruntime-genai" and report["scale"] == 2
    assert report["swap_failed"] == 0 and report["swap_versions_seen"][-1] == 3
    for kind in ("single", "batch"):
        assert report[f"server_{kind}_records_per_s"] > 0 and report[f"server_{kind}_failed"] == 0
        ratio = report[f"server_{kind}_records_per_s"] / report[f"raw_{kind}_records_per_s"]
        assert report[f"{kind}_ratio"] == pytest.approx(ratio, abs=0.002)
    assert re.search(r"^single: server/raw \d", done.stdout, re.M), done.stdout
