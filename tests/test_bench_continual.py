"""bench/tasks.py and bench/continual.py end to end on a small synthetic suite.

The benchmark is how the learner's targets are checked, so its budget rule and its JSON
shape are tested here: with ``--epochs`` every strategy makes the same passes over each
task's new examples (replay rides along in the batches, so a replaying cycle takes more
steps), joint makes them over the union, and ``--steps`` fixes the step count instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


tasks_mod = _load("tasks")
continual = _load("continual")


def test_tasks_are_deterministic_disjoint_and_balanced(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert tasks_mod.main(["--out", str(a), "--train", "60", "--test", "20"]) == 0
    assert tasks_mod.main(["--out", str(b), "--train", "60", "--test", "20"]) == 0
    for path in sorted(a.iterdir()):
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    rows = {
        split: [json.loads(x) for x in (a / f"parity.{split}.jsonl").read_text().splitlines()]
        for split in ("train", "test")
    }
    assert len(rows["train"]) == 60 and len(rows["test"]) == 20
    assert not {r["input"] for r in rows["train"]} & {r["input"] for r in rows["test"]}
    assert sorted(r["output"] for r in rows["test"]).count("even") == 10


def test_tasks_rejects_an_unknown_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        tasks_mod.main(["--out", str(tmp_path), "--family", "nope"])
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_continual_epoch_budget_and_report(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "r.json"
    tasks_mod.main(["--out", str(data), "--train", "40", "--test", "8"])
    rc = continual.main([
        "--data", str(data), "--tasks", "parity,vowel_end",
        "--strategies", "naive,replay+ewc,joint", "--epochs", "1", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["tasks"] == ["parity", "vowel_end"]
    res = payload["strategies"]
    # One pass of 40 examples, batch 8: naive takes 5 steps per task; replay+ewc takes 5 on
    # the first task (nothing to replay yet) and 10 on the second (4 new + 4 replayed per
    # batch); joint takes 80 / 8 = 10 steps over the union.
    assert res["naive"]["steps"] == 10
    assert res["replay+ewc"]["steps"] == 15
    assert res["joint"]["steps"] == 10
    for name in ("naive", "replay+ewc"):
        matrix = res[name]["matrix"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
        assert math.isclose(res[name]["aa"], sum(matrix[-1]) / 2)
        assert math.isclose(res[name]["bwt"], matrix[1][0] - matrix[0][0])
        assert all(0 <= v <= 100 for row in matrix for v in row)
    assert len(res["joint"]["matrix"]) == 1 and res["joint"]["bwt"] is None
    assert res["replay+ewc"]["fisher_seconds"] > 0 and res["naive"]["fisher_seconds"] == 0


@pytest.mark.slow
def test_continual_fixed_steps(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "r.json"
    tasks_mod.main(["--out", str(data), "--train", "40", "--test", "4"])
    rc = continual.main([
        "--data", str(data), "--tasks", "parity,vowel_end", "--strategies", "replay,joint",
        "--steps", "3", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())["strategies"]
    assert res["replay"]["steps"] == 6 and res["joint"]["steps"] == 6


def test_continual_refuses_a_budget_under_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag in ("--epochs", "--steps"):
        with pytest.raises(SystemExit):
            continual.main(["--data", str(tmp_path), "--tasks", "parity", flag, "0"])
        assert "must be at least 1" in capsys.readouterr().err


def test_continual_names_a_missing_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert continual.main(["--data", str(tmp_path), "--tasks", "nope"]) == 2
    assert "nope.train.jsonl" in capsys.readouterr().err
