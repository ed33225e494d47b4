"""What the CLI writes and prints around one real cycle (the ranking kind on the real MiniLM
encoder, the cheapest cycle that exports with torch.onnx's tracer): a JSON log that is JSON
on every line, `export` on both kinds, and `pull` and `report` writing under the state dir,
never into the current directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import DATASETS, cli_json, ingest, parity_rows, run_cli

pytestmark = pytest.mark.slow

CONFIG = """
[model]
base = "embedded:minilm"
[train]
lr = 2e-3
max_steps = 6
batch_size = 8
warmup_steps = 1
checkpoint_every = 0
[ranking]
max_candidates = 8
[export]
parity_prompts = 8
"""


def _rows(split: str, n: int) -> list[dict[str, Any]]:
    lines = (DATASETS / f"agnews.{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [{**json.loads(line), "split": split} for line in lines]


@pytest.fixture(scope="module")
def cycled(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> dict[str, Any]:
    """One promoted ranking cycle, run with a JSON log at DEBUG and progress on."""
    tmp = tmp_path_factory.mktemp("cli-output")
    (tmp / "aftertune.toml").write_text(CONFIG)
    env = {
        "AFTERTUNE_CONFIG": str(tmp / "aftertune.toml"),
        "AFTERTUNE_STATE_DIR": str(tmp / "state"),
        "AFTERTUNE_REDIS__URL": redis_server.url,
        "AFTERTUNE_REDIS__STREAM": f"cli-output-{tmp.name}",
    }
    ingest(env, tmp / "records.jsonl", _rows("train", 48) + _rows("test", 16))
    done = run_cli(
        "cycle", "--json", "--log-format", "json", "--log-level", "debug", env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"env": env, "tmp": tmp, "stderr": done.stderr, "cycle": json.loads(done.stdout)}


def test_a_json_log_cycle_is_json_on_every_line_with_library_warnings_at_debug(
    cycled: dict[str, Any],
) -> None:
    events = []
    for line in cycled["stderr"].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a line of the JSON log is not JSON: {line!r}")
    assert cycled["cycle"]["decision"] == "promoted"
    # torch.onnx's TracerWarning and the like: a developer's clue, never an operator's alarm.
    warned = [e for e in events if e["logger"] == "py.warnings"]
    assert all(e["level"] == "DEBUG" for e in warned), warned
    assert "batchs" not in cycled["stderr"]


def _in_empty_dir(tmp: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI run from an empty working directory, which it must leave empty."""
    cwd = tmp / f"cwd-{args[0]}"
    cwd.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "aftertune.daemon.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert list(cwd.iterdir()) == []
    return done


def test_pull_and_report_write_under_the_state_dir_by_default(cycled: dict[str, Any]) -> None:
    env, tmp = cycled["env"], cycled["tmp"]
    state = Path(env["AFTERTUNE_STATE_DIR"])
    pulled = json.loads(_in_empty_dir(tmp, "pull", "--from", str(state), "--json", env=env).stdout)
    assert Path(pulled["path"]).parent == state / "consumer"
    assert (state / "consumer" / "current" / "manifest.json").is_file()
    report = _in_empty_dir(tmp, "report", env=env).stdout.strip()
    assert report == str(state / "report.html")
    assert Path(report).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_export_of_a_ranking_version_prints_its_summary(cycled: dict[str, Any]) -> None:
    """It once wrote the bundle, then crashed on a key only the generative kind records."""
    out = cycled["tmp"] / "exported"
    done = run_cli("export", "1", "--out", str(out), env=cycled["env"], timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith(f"v1 exported to {out} (onnx-ranking, fp32): 8/8 parity")
    assert (out / "manifest.json").is_file()


def test_export_of_a_generative_version_prints_its_summary(redis_url: str, tmp_path: Path) -> None:
    env = {
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(tmp_path / "state"),
        "AFTERTUNE_TRAIN__MAX_STEPS": "3",
        "AFTERTUNE_TRAIN__PROGRESS": "false",
        "AFTERTUNE_EXPORT__PARITY_PROMPTS": "4",
        "AFTERTUNE_EXPORT__PARITY_MAX_NEW_TOKENS": "6",
    }
    ingest(env, tmp_path / "in.jsonl", parity_rows(60, seed=5))
    assert cli_json("train", "--json", env=env, timeout=600)["candidate"] == 1
    out = tmp_path / "exported"
    done = run_cli("export", "v1", "--out", str(out), env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"v1 exported to {out} (")
    assert "parity prompts answered as PyTorch does" in done.stdout
    assert (out / "manifest.json").is_file()
