"""Bring your own model: tiny random checkpoints of each family a user may set as model.base
go through train → `aftertune export` → consumer answer, and a cycle → pull → answer.

The checkpoints (tests/family_fixtures.py) are what ``save_pretrained`` writes for Llama,
Qwen2, Mistral, Gemma, Phi-3 and GPT-2, with tokenizers trained here in both styles real
checkpoints ship. The CLI runs in-process (its imports are paid once) and every ``--json``
answer must parse: stdout carries nothing else, whatever the exporters print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from family_fixtures import save_family
from learner_fixtures import single_thread  # noqa: F401 - autouse: one intra-op thread

from aftertune.daemon.cli import main
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import FORMAT_GENAI, FORMAT_LOGITS, verify_bundle
from aftertune.store.examples import ExampleStore
from aftertune.store.records import parse_record
from aftertune.store.registry import Registry, VersionState

pytestmark = pytest.mark.slow

# (family, tokenizer style, the bundle format its export ends in, leaf modules adapted)
LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CASES = [
    ("llama", "bytebpe", FORMAT_GENAI, LLAMA_LIKE),
    ("qwen2", "bytebpe", FORMAT_GENAI, LLAMA_LIKE),
    ("gemma", "bytebpe", FORMAT_GENAI, LLAMA_LIKE),
    # SentencePiece-style (as Llama 2, Mistral and Gemma ship): onnxruntime-genai's tokenizer
    # gives other ids -> torch fallback. One family is enough: the fallback is ~2x the cost.
    ("mistral", "metaspace", FORMAT_LOGITS, LLAMA_LIKE),
    # Fused projections: all-linear must cover them, not just o_proj and down_proj.
    ("phi3", "bytebpe", FORMAT_GENAI, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    # Conv1D layers; the genai builder does not know GPT-2 -> torch fallback.
    ("gpt2", "bytebpe", FORMAT_LOGITS, {"c_attn", "c_proj", "c_fc"}),
]

QA = [
    ("谁在医院工作？", "一名医生"),
    ("中国的首都是哪里？", "北京"),
    ("What does instruction tuning teach?", "to answer questions"),
    ("Where does the doctor work?", "in the hospital"),
]


def _records() -> list[str]:
    rows: list[dict[str, Any]] = []
    for i in range(16):
        rows.append(
            {
                "task": "parity",
                "instruction": "Is the number even or odd?",
                "input": str(1000 + 7 * i),
                "output": "even" if (1000 + 7 * i) % 2 == 0 else "odd",
                "split": "test" if i % 4 == 0 else "train",
            }
        )
    for i, (question, answer) in enumerate(QA * 2):
        rows.append(
            {
                "task": "qa",
                "instruction": question,
                "input": "",
                "output": answer,
                "split": "test" if i % 4 == 3 else "train",
                "id": f"qa-{i}",
            }
        )
    return [json.dumps(r, ensure_ascii=False) for r in rows]


def _cli_json(capfd: pytest.CaptureFixture[str], *args: str) -> Any:
    code = main(list(args))
    out, err = capfd.readouterr()
    assert code == 0, (out[:3000], err[-2000:])
    return json.loads(out)  # the whole of stdout: nothing else may be printed there


@pytest.fixture
def state(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, ExampleStore]:
    state_dir = tmp_path / "state"
    for key, value in {
        "STATE_DIR": str(state_dir),
        "REDIS__URL": redis_url,
        "TRAIN__MAX_STEPS": "4",
        "TRAIN__BATCH_SIZE": "4",
        "TRAIN__MAX_LENGTH": "96",
        "TRAIN__PROGRESS": "false",
        "LORA__R": "4",
        "EVAL__MAX_NEW_TOKENS": "6",
        "EXPORT__PARITY_PROMPTS": "4",
        "EXPORT__PARITY_MAX_NEW_TOKENS": "6",
    }.items():
        monkeypatch.setenv(f"AFTERTUNE_{key}", value)
    with ExampleStore.in_state_dir(state_dir) as store:
        store.add([parse_record(line) for line in _records()])
    return state_dir, store


@pytest.mark.parametrize(("family", "style", "fmt", "adapted"), CASES, ids=[c[0] for c in CASES])
def test_a_checkpoint_trains_exports_and_answers(
    family: str,
    style: str,
    fmt: str,
    adapted: set[str],
    state: tuple[Path, ExampleStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AFTERTUNE_MODEL__BASE", str(save_family(tmp_path / family, family, style)))

    trained = _cli_json(capfd, "train", "--json")
    assert trained["candidate"] == 1
    # Every layer of each kind: 2 decoder layers (GPT-2's c_proj: attention and MLP, so 4).
    assert set(trained["adapted_modules"]) == adapted
    assert all(
        n == (4 if (family, m) == ("gpt2", "c_proj") else 2)
        for m, n in trained["adapted_modules"].items()
    )

    out = tmp_path / "bundle"
    exported = _cli_json(capfd, "export", "1", "--out", str(out), "--json")
    assert exported["format"] == fmt and exported["precision"] == "fp32"
    parity = exported["parity"]
    assert parity["prompts"] == parity["identical"] == parity["prompt_ids_identical"] == 4
    reason = exported["export"]["fallback_reason"]
    if fmt == FORMAT_GENAI:
        assert reason is None
    elif style == "metaspace":
        assert reason.startswith("genai: tokenizer: the bundle encodes"), reason
    else:
        assert reason.startswith("genai: genai builder exited 1"), reason
    assert verify_bundle(out)["parity"] == parity  # recorded in the manifest

    # The consumer answers (random weights: any text, but no traceback).
    assert isinstance(Bundle.open(out).generate(instruction="谁在医院工作？"), str)


def test_a_cycle_publishes_and_a_consumer_pulls_and_answers_with_json_only_on_stdout(
    state: tuple[Path, ExampleStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # The genai path (the quickest); the torch.onnx path, whose exporter prints progress on
    # stdout, is held to JSON-only stdout by `export --json` above.
    base = save_family(tmp_path / "qwen2", "qwen2", "bytebpe")
    monkeypatch.setenv("AFTERTUNE_MODEL__BASE", str(base))
    # A random model cannot beat always answering the majority label: not what is tested.
    monkeypatch.setenv("AFTERTUNE_GATE__BEAT_CHANCE", "false")
    cycle = _cli_json(capfd, "cycle", "--json")
    assert cycle["decision"] == "promoted", cycle["reasons"]
    assert set(cycle["trained"]["adapted_modules"]) == LLAMA_LIKE
    state_dir = state[0]
    pulled = _cli_json(
        capfd, "pull", "--from", str(state_dir), "--to", str(tmp_path / "consumer"), "--json"
    )
    assert pulled["version"] == 1
    manifest = verify_bundle(Path(pulled["path"]))
    assert manifest["format"] == FORMAT_GENAI and manifest["parity"]["prompt_ids_identical"] > 0
    code = main(["generate", "--bundle", str(tmp_path / "consumer" / "current"), "--prompt", "x"])
    assert code == 0 and "Traceback" not in capfd.readouterr().err


def test_a_cycle_whose_exporters_both_fail_rejects_the_challenger_with_both_reasons(
    state: tuple[Path, ExampleStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import aftertune.learners.kinds.generative.export as export_module

    def crash(*_: Any) -> None:  # what onnxruntime-genai's tokenizer once did to parity
        raise IndexError("list index out of range")

    monkeypatch.setattr(export_module, "_run_builder", crash)
    monkeypatch.setattr(export_module, "_torch_export", crash)
    monkeypatch.setenv(
        "AFTERTUNE_MODEL__BASE", str(save_family(tmp_path / "m", "llama", "bytebpe"))
    )
    monkeypatch.setenv("AFTERTUNE_GATE__BEAT_CHANCE", "false")
    assert main(["cycle", "--json"]) == 3  # rejected: no traceback, no exit 1
    cycle = json.loads(capfd.readouterr().out)
    assert cycle["decision"] == "rejected"
    assert cycle["reasons"] == [
        "export: genai: IndexError: list index out of range; "
        "torch: IndexError: list index out of range"
    ]
    with Registry(state[0]) as registry:  # decided, not left `evaluating` for every rerun
        assert registry.get(1).state is VersionState.REJECTED
        assert registry.champion() is None
    # `aftertune export` of that rejected version says why it cannot, and writes nothing.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("a user's file")
    assert main(["export", "v1", "--out", str(taken)]) == 1
    assert "already exists and is not empty" in capfd.readouterr().err
    assert main(["export", "1", "--out", str(tmp_path / "new")]) == 1
    err = capfd.readouterr().err
    assert "genai: IndexError" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists() and [p.name for p in taken.iterdir()] == ["keep.txt"]
