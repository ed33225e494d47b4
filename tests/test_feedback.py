"""Feedback on a served answer: the wire fields, the answer server pushing a correction or a
rating to the real feedback stream and the daemon's real ingest storing it, and a thumbs-down
on a ranking answer pushing that candidate down for that input."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from consumer_fixtures import export_published_state

from aftertune.daemon.answer_feedback import StreamSink
from aftertune.daemon.answer_log import AnswerLog
from aftertune.daemon.answer_metrics import AnswerMetrics
from aftertune.daemon.answer_server import build_answer_app
from aftertune.daemon.hot_swap import BundleSlot
from aftertune.daemon.ingest import IngestConfig, Ingestor
from aftertune.daemon.server import HttpServer
from aftertune.store.consumer.pull import DirSource, pull
from aftertune.store.errors import RecordError
from aftertune.store.examples import ExampleStore
from aftertune.store.records import FEEDBACK_META, Split, content_id, parse_record, rating_of

STREAM = "aftertune:feedback"
BASE = {"task": "intent", "instruction": "Classify.", "input": "where is my parcel", "output": "a"}


def test_an_old_producer_s_record_keeps_its_id_and_meaning() -> None:
    record = parse_record(json.dumps({**BASE, "meta": {"rating": "5 stars"}}))
    assert record.id == content_id("intent", "Classify.", "where is my parcel", "a")
    assert record.meta == {"rating": "5 stars"} and rating_of(record.meta) is None


def test_served_fields_travel_in_the_stored_meta_and_a_rating_changes_the_id() -> None:
    served = {"answer_id": "x1", "served_version": 3, "served_answer": "a"}
    up = parse_record(json.dumps({**BASE, **served, "rating": "up"}))
    down = parse_record(json.dumps({**BASE, **served, "rating": "down"}))
    assert up.meta[FEEDBACK_META] == {**served, "rating": "up"}
    assert rating_of(down.meta) == "down"
    assert len({up.id, down.id, parse_record(json.dumps(BASE)).id}) == 3


def test_a_thumbs_down_always_trains_and_never_is_held_out() -> None:
    splits = {
        parse_record(json.dumps({**BASE, "input": str(n), "rating": "down"})).split
        for n in range(200)
    }
    assert splits == {Split.TRAIN}
    with pytest.raises(RecordError, match="cannot be split 'test'"):
        parse_record(json.dumps({**BASE, "rating": "down", "split": "test"}))


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"rating": "meh"}, 'field \'rating\' must be "up" or "down"'),
        ({"served_version": 0}, "must be a version"),
        ({"served_version": 1.5}, "field 'served_version' must be an integer"),
        ({"meta": {FEEDBACK_META: {}}}, "is reserved for what was served"),
        ({"answer_id": " "}, "field 'answer_id' must be a non-empty string"),
    ],
)
def test_bad_feedback_fields_are_refused_naming_the_field(extra: dict[str, Any], says: str) -> None:
    with pytest.raises(RecordError, match=says.replace("(", r"\(")):
        parse_record(json.dumps({**BASE, **extra}))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_published_state(tmp_path_factory.mktemp("feedback") / "state")


@pytest.fixture
def server(published: Path, tmp_path: Path, redis_url: str) -> Iterator[str]:
    state = Path(shutil.copytree(published, tmp_path / "state", symlinks=True))
    pull(DirSource(state), tmp_path / "consumer")
    sink = StreamSink(redis_url, STREAM)
    app = build_answer_app(
        BundleSlot(tmp_path / "consumer" / "current"),
        AnswerLog(),
        AnswerMetrics(),
        feedback=sink,
    )
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    yield f"http://127.0.0.1:{http.port}"
    http.stop()
    sink.close()


def post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_correction_and_ratings_land_as_stored_records_with_their_lineage(
    server: str, redis_url: str, tmp_path: Path
) -> None:
    question = {"task": "greet", "instruction": "Say hi.", "input": "Ann"}
    code, served = post(f"{server}/v1/answer", question)
    assert code == 200
    answer_id = served["answer_id"]
    for feedback in ({"correction": "Hello, Ann!"}, {"rating": "up"}, {"rating": "down"}):
        code, got = post(f"{server}/v1/feedback", {"answer_id": answer_id, **feedback})
        assert code == 202, got
    code, missing = post(f"{server}/v1/feedback", {"answer_id": "gone", "rating": "up"})
    assert code == 404 and "no answer 'gone' here" in missing["detail"]

    client = redis.Redis.from_url(redis_url)
    config = IngestConfig(
        stream=STREAM, dead_letter_stream=STREAM + ":dead", group="g", consumer="c"
    )
    with ExampleStore(tmp_path / "examples.sqlite3") as store:
        ingestor = Ingestor(client, store, config)
        ingestor.ensure_group()
        ingestor.drain()
        ids = [parse_record(f[b"record"]).id for _, f in client.xrange(STREAM)]
        stored = {(e.output, rating_of(e.meta)): e for e in store.get(ids)}
    assert client.xlen(STREAM + ":dead") == 0
    client.close()
    lineage = {"answer_id": answer_id, "served_version": 1, "served_answer": served["answer"]}
    correction = stored[("Hello, Ann!", None)]
    assert (correction.task, correction.instruction, correction.input) == (
        "greet",
        "Say hi.",
        "Ann",
    )
    assert correction.meta[FEEDBACK_META] == lineage and correction.source == "answer-server"
    assert stored[(served["answer"], "up")].meta[FEEDBACK_META] == {**lineage, "rating": "up"}
    assert stored[(served["answer"], "down")].split == "train"


def test_a_thumbs_down_on_a_ranking_answer_pushes_that_candidate_down_for_that_input() -> None:
    """The real MiniLM encoder, the ranking kind's real loss: a few steps on one record rated
    down lower the rejected candidate's probability for that input; the same record unrated
    would raise it."""
    from dataclasses import dataclass, field

    import torch

    from aftertune.learners.base_model import EMBEDDED_MINILM, load_base
    from aftertune.learners.kinds.generative.objective import ResponseObjective
    from aftertune.learners.kinds.ranking.encoder import embed_ids, pad_token, sep_token
    from aftertune.learners.kinds.ranking.objective import RankingObjective
    from aftertune.learners.specs import RankingSpec
    from aftertune.store.prompt import DEFAULT_PROMPT

    @dataclass(frozen=True)
    class Ex:
        task: str
        instruction: str
        input: str
        output: str
        weight: float = 1.0
        meta: dict[str, Any] = field(default_factory=dict)

    candidates = ["sports", "business", "science"]
    down = Ex(
        "news",
        "Topic?",
        "the striker scored twice",
        "sports",
        meta={FEEDBACK_META: {"rating": "down"}},
    )

    def p_rejected(after_steps_on: Ex) -> tuple[float, float]:
        torch.manual_seed(0)
        model, tokenizer = load_base(EMBEDDED_MINILM)
        objective = RankingObjective(
            tokenizer, {"news": candidates}, RankingSpec(), max_length=64, template=DEFAULT_PROMPT
        )
        encoded, _ = objective.encode(
            tokenizer, [after_steps_on], max_length=64, template=DEFAULT_PROMPT
        )

        def p() -> float:
            with torch.no_grad():
                pad = pad_token(tokenizer)
                prompt = embed_ids(model, [encoded[0].input_ids], pad, "cpu", sep_token(tokenizer))
                answers = embed_ids(model, objective._ids["news"], pad, "cpu", sep_token(tokenizer))
                logits = prompt @ answers.T / RankingSpec().temperature
                return float(logits.softmax(-1)[0, 0])

        before = p()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for _ in range(3):
            optimizer.zero_grad()
            objective.loss(model, encoded, torch.device("cpu"), False)[0].backward()
            optimizer.step()
        model.eval()
        return before, p()

    before, after = p_rejected(down)
    assert after < before - 0.01, (before, after)
    before, after = p_rejected(Ex(down.task, down.instruction, down.input, down.output))
    assert after > before, (before, after)
    # The generative kind stores a thumbs-down and does not train on it as an answer.
    assert ResponseObjective.kept(None, [down, Ex("t", "i", "", "o")], "new") == [  # type: ignore[arg-type]
        Ex("t", "i", "", "o")
    ]
