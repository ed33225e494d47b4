"""`aftertune answer-server`: answers over real HTTP from a real bundle, refuses bad input
with a 4xx that says what to fix, and swaps bundles under load without failing a request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from consumer_fixtures import eventually, export_published_state, republish

from aftertune.daemon.answer_log import AnswerLog
from aftertune.daemon.answer_metrics import AnswerMetrics
from aftertune.daemon.answer_server import AnswerLimits, build_answer_app
from aftertune.daemon.embedded_redis import free_port
from aftertune.daemon.hot_swap import BundleSlot
from aftertune.daemon.server import HttpServer
from aftertune.store.bundles import point
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.pull import DirSource, pull

TOKEN = "answer-token"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_published_state(tmp_path_factory.mktemp("answers") / "state")


@pytest.fixture
def state(published: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(published, tmp_path / "state", symlinks=True))


@pytest.fixture
def consumer(state: Path, tmp_path: Path) -> Path:
    to_dir = tmp_path / "consumer"
    pull(DirSource(state), to_dir)
    return to_dir


class Client:
    def __init__(self, url: str, token: str | None = TOKEN) -> None:
        self.url, self.token = url, token

    def post(self, path: str, body: Any, *, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> str:
        request = urllib.request.Request(self.url + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()


@pytest.fixture
def served(consumer: Path) -> Iterator[tuple[Client, BundleSlot, AnswerLog]]:
    metrics = AnswerMetrics()
    slot = BundleSlot(
        consumer / "current",
        interval_s=0.05,
        on_swap=lambda bundle: metrics.swaps.inc(),
        on_refused=lambda target, reason: metrics.refused.inc(),
    )
    answers = AnswerLog(max_answers=3, ttl_s=60)
    limits = AnswerLimits(max_body_bytes=4096, max_batch=4)
    app = build_answer_app(slot, answers, metrics, token=TOKEN, limits=limits)
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    slot.start()
    try:
        yield Client(f"http://127.0.0.1:{http.port}"), slot, answers
    finally:
        slot.stop()
        http.stop()


def test_one_record_and_a_batch_are_answered_with_version_and_answer_id(
    served: tuple[Client, BundleSlot, AnswerLog], consumer: Path
) -> None:
    client, _, _ = served
    direct = Bundle.open(consumer / "current")
    assert direct.holds_gil  # onnxruntime-genai: one record is answered on the event loop
    question = {"task": "t", "instruction": "Reverse the word.", "input": "abc"}
    code, one = client.post("/v1/answer", question)
    assert code == 200
    assert one["version"] == 1 and one["answer_id"]
    assert one["answer"] == direct.answer("t", "Reverse the word.", "abc")
    code, batch = client.post("/v1/answer", {"records": [question, {"instruction": "Say hi."}]})
    assert code == 200
    assert [a["answer"] for a in batch["answers"]] == [
        one["answer"],
        direct.answer(None, "Say hi.", ""),
    ]
    assert len({a["answer_id"] for a in batch["answers"]} | {one["answer_id"]}) == 3
    assert 'aftertune_answer_requests_total{code="200",endpoint="answer"} 2.0' in client.get(
        "/metrics"
    )


@pytest.mark.parametrize(
    ("body", "raw", "code", "says"),
    [
        (None, b"{not json", 400, "not valid JSON"),
        ({"input": "x"}, None, 422, "field 'instruction' is missing"),
        ({"instruction": "  "}, None, 422, "must not be empty"),
        ({"instruction": "a", "prompt": "b"}, None, 422, "unknown field 'prompt'"),
        ({"instruction": 3}, None, 422, "field 'instruction' must be a string"),
        ({"records": []}, None, 422, "non-empty array"),
        ({"records": [{"instruction": "a"}] * 5}, None, 413, "the limit is 4: split it"),
        ({"records": [{"instruction": "a"}, {"input": "b"}]}, None, 422, "records[1]"),
        ({"instruction": "a" * 5000}, None, 413, "the limit is 4096 bytes"),
        ({"answer_id": "nope", "rating": "up"}, None, 503, "feedback is off"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_to_fix(
    served: tuple[Client, BundleSlot, AnswerLog], body: Any, raw: bytes | None, code: int, says: str
) -> None:
    client, _, _ = served
    path = "/v1/feedback" if body and "answer_id" in body else "/v1/answer"
    got, answer = client.post(path, body, raw=raw)
    assert got == code, answer
    assert says in answer["detail"]


def test_a_token_is_required_when_set(served: tuple[Client, BundleSlot, AnswerLog]) -> None:
    client, _, _ = served
    code, answer = Client(client.url, token=None).post("/v1/answer", {"instruction": "a"})
    assert code == 401 and "bearer token" in answer["detail"]
    with urllib.request.urlopen(client.url + "/readyz") as response:  # probes need none
        assert json.loads(response.read()) == {"status": "ready", "version": 1}


def test_answer_ids_are_bounded_by_count_and_age() -> None:
    log = AnswerLog(max_answers=2, ttl_s=0.2)
    first, second, third = (log.remember("t", "i", "", "a", 1) for _ in range(3))
    assert log.find(first.answer_id) is None  # pushed out by the third
    assert log.find(third.answer_id) == third
    time.sleep(0.25)
    assert log.find(second.answer_id) is None and log.find(third.answer_id) is None


def test_swaps_under_load_fail_no_request_and_a_bad_bundle_is_refused(
    served: tuple[Client, BundleSlot, AnswerLog], state: Path, consumer: Path
) -> None:
    client, slot, _ = served
    failures: list[str] = []
    versions: set[int] = set()
    answered = 0
    done = threading.Event()

    def ask(n: int) -> None:
        nonlocal answered
        while not done.is_set():
            body: Any = {"instruction": "Say hi.", "input": str(n)}
            if n % 2:
                body = {"records": [body, body]}
            try:
                code, got = client.post("/v1/answer", body)
            except OSError as exc:  # a connection refused or reset counts as a failure
                failures.append(repr(exc))
                continue
            if code != 200:
                failures.append(f"{code} {got}")
                continue
            for one in got.get("answers", [got]):
                versions.add(one["version"])
            answered += 1

    clients = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    try:
        for version in (2, 3, 4):
            republish(state / "bundles", version)
            pull(DirSource(state), consumer)
            eventually(lambda v=version: slot.bundle.version == v, 20, f"v{version} swapped in")
            time.sleep(0.3)
        # A bundle that does not verify: one flipped byte. Refused; v4 keeps answering.
        bad = consumer / "v9"
        shutil.copytree(consumer / "v4", bad)
        onnx = bad / "model.onnx.data"
        data = bytearray(onnx.read_bytes())
        data[len(data) // 2] ^= 1
        onnx.write_bytes(bytes(data))
        point(consumer / "current", "v9")
        eventually(lambda: "aftertune_answer_swaps_refused_total 1.0" in client.get("/metrics"))
        time.sleep(0.3)
    finally:
        done.set()
        for thread in clients:
            thread.join(30)
    assert failures == []
    assert answered > 20
    assert versions == {1, 2, 3, 4}
    assert slot.bundle.version == 4
    code, after = client.post("/v1/answer", {"instruction": "Say hi."})
    assert code == 200 and after["version"] == 4
    assert "aftertune_answer_swaps_total 3.0" in client.get("/metrics")


def test_the_cli_serves_and_stops_cleanly_on_sigterm(consumer: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "aftertune.daemon.cli", "answer-server"),
            *("--bundle", str(consumer / "current"), "--port", str(port)),
        ],
        env={
            **os.environ,
            "AFTERTUNE_STATE_DIR": str(tmp_path / "s"),
            "AFTERTUNE_ANSWER_TOKEN": "",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = Client(f"http://127.0.0.1:{port}", token=None)

        def up() -> bool:
            try:
                return client.post("/v1/answer", {"instruction": "Say hi."})[0] == 200
            except OSError:
                return False

        try:
            eventually(up, 30, "the answer server answers")
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "answering with v1" in err and "feedback off: no Redis URL" in err


def test_every_answer_server_metric_is_documented_with_its_unit() -> None:
    import re

    import prometheus_client

    text = prometheus_client.generate_latest(AnswerMetrics().registry).decode()
    families = {f for f in re.findall(r"^# TYPE (\S+) ", text, re.M) if not f.endswith("_created")}
    operations = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    for family in families:
        row = re.search(rf"^\| `{family}(_total)?` \| \w+ \| (\w+) \|", operations, re.M)
        assert row is not None, f"{family} is not in docs/operations.md's answer-server table"
