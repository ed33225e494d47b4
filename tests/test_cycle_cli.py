"""`aftertune train` and `aftertune eval` end to end: real Redis, real store, real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_json, parity_rows, run_cli, write_jsonl

from aftertune.store.registry import Registry, VersionState

pytestmark = pytest.mark.slow


def test_train_registers_a_candidate_that_beats_the_base(redis_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {
        "AFTERTUNE_REDIS__URL": redis_url,
        "AFTERTUNE_STATE_DIR": str(state),
        "AFTERTUNE_TRAIN__MAX_STEPS": "40",
        "AFTERTUNE_TRAIN__PROGRESS": "false",
        "AFTERTUNE_TRAIN__CHECKPOINT_EVERY": "20",
    }
    empty = run_cli("train", env=env, timeout=300)
    assert empty.returncode == 1 and "no new train examples" in empty.stderr
    idle = run_cli("cycle", env=env, timeout=300)
    assert idle.returncode == 5, idle.stderr  # nothing to do, for scripts to branch on
    assert idle.stdout.startswith("no cycle: no new train examples")

    write_jsonl(tmp_path / "in.jsonl", parity_rows(400, seed=3, high=10_000))
    assert run_cli("push", str(tmp_path / "in.jsonl"), env=env).returncode == 0
    assert run_cli("serve", "--burst", env=env).returncode == 0

    report = cli_json("train", "--json", env=env)
    expected = {
        "candidate", "new_examples", "replay_examples", "steps", "loss_first", "loss_last",
        "tokens_per_s", "fisher_seconds", "train_seconds",
    }  # fmt: skip
    assert expected <= set(report)
    assert report["candidate"] == 1 and report["steps"] == 40
    assert 330 < report["new_examples"] < 390  # ~10 % went to the held-out split
    assert report["loss_last"] < report["loss_first"]

    with Registry(state) as registry:
        version = registry.get(1)
        assert version.state is VersionState.CANDIDATE
        assert (version.adapter_dir / "adapter_config.json").is_file()
        assert (version.adapter_dir / "adapter_model.safetensors").is_file()
        assert version.lineage["trained_on"]["count_by_task"] == {"parity": report["new_examples"]}
        assert len(version.lineage["base_sha256"]) == 64
    assert not (state / "work").exists() or not any((state / "work").iterdir())

    scores = cli_json("eval", "--candidate", "1", "--json", env=env)
    champion, candidate = scores["champion"]["parity"], scores["candidate"]["parity"]
    assert champion["n"] == candidate["n"] > 0
    assert set(candidate) >= {"accuracy", "nll", "n"}
    assert candidate["nll"] < champion["nll"]
    assert json.dumps(cli_json("eval", "--json", env=env)) == json.dumps(scores["champion"])
