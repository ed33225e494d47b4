"""`aftertune status` sees a learning cycle that `aftertune cycle` runs in another shell: its
phase, pid and start time while it runs, nothing once it has ended or its process died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_json, ingest, parity_rows

from aftertune.daemon.running_cycle import read_running_cycle, running_cycle
from aftertune.daemon.status import render_status
from aftertune.store.layout import StateLayout


def test_the_record_follows_training_and_is_gone_when_the_cycle_ends(tmp_path: Path) -> None:
    with running_cycle(tmp_path, "aftertune cycle") as progress:
        found = read_running_cycle(tmp_path)
        assert found is not None
        assert (found["pid"], found["phase"], found["command"]) == (
            os.getpid(),
            "starting",
            "aftertune cycle",
        )
        assert abs(found["started_at"] - time.time()) < 60
        assert progress(30, 30) is False  # records, never stops the training
        found = read_running_cycle(tmp_path)
        assert found is not None and found["phase"] == "evaluating and publishing"
    assert read_running_cycle(tmp_path) is None
    assert not StateLayout(tmp_path).cycle_in_progress.exists()

    with pytest.raises(RuntimeError), running_cycle(tmp_path, "aftertune cycle"):
        raise RuntimeError("the cycle failed")
    assert not StateLayout(tmp_path).cycle_in_progress.exists()


def test_a_record_left_by_a_dead_process_is_not_a_running_cycle(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    record = {"command": "aftertune cycle", "pid": int(gone.stdout), "started_at": time.time()}
    StateLayout(tmp_path).cycle_in_progress.write_text(json.dumps(record))
    assert read_running_cycle(tmp_path) is None


def test_status_text_names_the_phase_pid_and_start() -> None:
    status = {
        "stream": {"length": 0, "pending": 0, "unread": 0, "dead": 0},
        "examples": {},
        "champion": None,
        "daemon": None,
        "cycle": {
            "command": "aftertune cycle",
            "pid": 4242,
            "started_at": time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1)),
            "phase": "training 40% (step 12 of 30)",
        },
    }
    text = render_status(status)
    assert "daemon: not running" in text
    assert (
        "cycle in progress: training 40% (step 12 of 30); `aftertune cycle`, pid 4242, "
        "started 03:04:05 (local)"
    ) in text


@pytest.mark.slow
def test_status_in_another_shell_shows_the_cycle_while_it_runs(
    redis_url: str, tmp_path: Path
) -> None:
    env = {
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(tmp_path / "state"),
        "AFTERTUNE_TRAIN__MAX_STEPS": "100000",  # still training when Ctrl-C ends it
        "AFTERTUNE_TRAIN__PROGRESS": "false",
    }
    ingest(env, tmp_path / "in.jsonl", parity_rows(300, seed=4))
    cycle = subprocess.Popen(
        [sys.executable, "-m", "aftertune.daemon.cli", "cycle"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found = None
    try:
        deadline = time.monotonic() + 600
        while cycle.poll() is None and time.monotonic() < deadline:
            found = cli_json("status", "--json", env=env, timeout=60)["cycle"]
            if found is not None and str(found["phase"]).startswith("training"):
                break
            time.sleep(0.5)
        cycle.send_signal(signal.SIGINT)  # Ctrl-C in the other shell
        _, err = cycle.communicate(timeout=120)
    finally:
        cycle.kill()
    assert found is not None, f"status never showed the running cycle: {err}"
    assert found["pid"] == cycle.pid and found["command"] == "aftertune cycle"
    assert str(found["phase"]).startswith("training"), found
    assert cycle.returncode == 130, err
    assert cli_json("status", "--json", env=env)["cycle"] is None  # ended: gone from status
