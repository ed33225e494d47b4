"""Shadow evaluation on the answer server (issue 26 item 4): the challenger the daemon
announces is pulled and answers a sample of live requests beside the champion. Real parts:
the tiny base exported for real (two bundles that answer differently: another prompt
template), the daemon's real HTTP server announcing the candidate, the answer server over
real HTTP, a real Redis for feedback and reports.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import pytest
import redis
from consumer_fixtures import eventually, export_published_state, install_copy_of_v1
from test_answer_server import Client

from aftertune.daemon.answer_feedback import StreamSink
from aftertune.daemon.answer_log import AnswerLog
from aftertune.daemon.answer_metrics import AnswerMetrics
from aftertune.daemon.answer_server import build_answer_app
from aftertune.daemon.embedded_redis import free_port
from aftertune.daemon.hot_swap import BundleSlot
from aftertune.daemon.server import HttpServer, build_app
from aftertune.daemon.shadow import Shadow, ShadowMetrics, ShadowSpec
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.pull import DirSource, pull
from aftertune.store.shadow import parse_report

TOKEN = "answer-token"
DAEMON_TOKEN = "daemon-token"
STREAM = "aftertune:shadow"
# The challenger: the champion's weights behind another prompt template (one letter in lower
# case), so that it answers some questions as the champion does and others otherwise.
OTHER_PROMPT = {
    "with_input": "instruction: {instruction}\nInput: {input}\nResponse: ",
    "without_input": "instruction: {instruction}\nResponse: ",
}
QUESTIONS = [
    {"task": "t", "instruction": instruction, "input": text}
    for instruction in ("Reverse the word.", "Say hi.", "Repeat the input.", "Count the letters.")
    for text in ("abc", "hello", "xyz")
]


def publish_challenger(bundles: Path, version: int) -> Path:
    """v1's files as ``version`` with ``OTHER_PROMPT``: installed, not made latest."""
    return install_copy_of_v1(bundles, version, prompt=OTHER_PROMPT)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = export_published_state(tmp_path_factory.mktemp("shadow") / "state")
    publish_challenger(state / "bundles", 2)
    return state


@pytest.fixture
def state(published: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(published, tmp_path / "state", symlinks=True))


@dataclass
class Daemon:
    """The daemon's real HTTP server; ``announce[0]`` is the version it calls the candidate."""

    url: str
    announce: list[int | None]


@pytest.fixture
def daemon(state: Path) -> Iterator[Daemon]:
    announce: list[int | None] = [2]
    app = build_app(
        state / "bundles",
        token=DAEMON_TOKEN,
        ready=lambda: True,
        metrics=prometheus_client.CollectorRegistry(),
        candidate=lambda: announce[0],
    )
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    try:
        yield Daemon(f"http://127.0.0.1:{http.port}", announce)
    finally:
        http.stop(timeout=5)


@dataclass
class Served:
    client: Client
    shadow: Shadow
    champion: Bundle
    challenger: Bundle


@pytest.fixture
def served(
    state: Path, daemon: Daemon, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Served]:
    consumer = tmp_path / "consumer"
    pull(DirSource(state), consumer)  # the champion, v1
    metrics = AnswerMetrics()
    queue = getattr(request, "param", 1024)
    spec = ShadowSpec(
        server=daemon.url,
        token=DAEMON_TOKEN,
        rate=1.0,
        to_dir=tmp_path / "shadow",
        redis_url=redis_url,
        stream=STREAM,
        poll_s=0.1,
        report_every_s=0.1,
        queue=queue,
    )
    shadow = Shadow(spec, ShadowMetrics(metrics.registry), server_id="answers-a", seed=1)
    slot = BundleSlot(consumer / "current")
    sink = StreamSink(redis_url, "aftertune:feedback")
    app = build_answer_app(slot, AnswerLog(), metrics, token=TOKEN, feedback=sink, shadow=shadow)
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    shadow.start()
    try:
        eventually(lambda: shadow.follower.bundle is not None, 30, "the candidate pulled")
        yield Served(
            Client(f"http://127.0.0.1:{http.port}", TOKEN),
            shadow,
            Bundle.open(consumer / "current"),
            Bundle.open(state / "bundles" / "v2"),
        )
    finally:
        shadow.stop()
        http.stop()
        sink.close()


def _newest_report(client: redis.Redis) -> dict[str, int] | None:
    entries = client.xrevrange(STREAM, count=1)
    if not entries:
        return None
    report = parse_report(entries[0][1])
    assert report is not None
    return {
        "version": report.version,
        "compared": report.compared,
        "agreed": report.agreed,
        "feedback": report.feedback,
        "feedback_agreed": report.feedback_agreed,
    }


def test_clients_get_the_champions_answers_and_agreement_is_counted_and_reported(
    served: Served, redis_client: redis.Redis
) -> None:
    champion = [served.champion.answer(q["task"], q["instruction"], q["input"]) for q in QUESTIONS]
    challenger = [
        served.challenger.answer(q["task"], q["instruction"], q["input"]) for q in QUESTIONS
    ]
    same = sum(a.strip() == b.strip() for a, b in zip(champion, challenger, strict=True))
    assert 0 < same < len(QUESTIONS), "the two bundles must agree on some questions only"

    given = []
    for question in QUESTIONS[:6]:
        code, one = served.client.post("/v1/answer", question)
        assert code == 200
        given.append(one)
    code, batch = served.client.post("/v1/answer", {"records": QUESTIONS[6:]})
    assert code == 200
    given += batch["answers"]
    # What a client gets is the champion's answer, from the champion's version, every time.
    assert [g["answer"] for g in given] == champion
    assert {g["version"] for g in given} == {1}

    eventually(lambda: (served.shadow.totals() or {}).get("compared") == len(QUESTIONS))
    assert served.shadow.totals() == {
        "version": 2,
        "compared": len(QUESTIONS),
        "agreed": same,
        "feedback": 0,
        "feedback_agreed": 0,
    }

    # Feedback on shadowed answers: which the challenger agrees with.
    differ = [i for i in range(len(QUESTIONS)) if champion[i].strip() != challenger[i].strip()]
    agree = [i for i in range(len(QUESTIONS)) if i not in differ]
    feedback = [
        ({"correction": challenger[differ[0]]}, differ[0], True),  # corrected to its answer
        ({"correction": "something else"}, differ[-1], False),
        ({"rating": "up"}, agree[0], True),  # the confirmed answer is the challenger's too
        ({"rating": "down"}, agree[-1], False),  # a wrong answer the challenger gave too
    ]
    if len(differ) > 2:
        feedback.append(({"rating": "down"}, differ[1], True))  # it answered otherwise
    for body, i, _ in feedback:
        code, _ = served.client.post("/v1/feedback", {"answer_id": given[i]["answer_id"], **body})
        assert code == 202
    # A second feedback on one answer counts once.
    code, _ = served.client.post(
        "/v1/feedback", {"answer_id": given[agree[0]]["answer_id"], "rating": "up"}
    )
    assert code == 202
    expected = {
        "version": 2,
        "compared": len(QUESTIONS),
        "agreed": same,
        "feedback": len(feedback),
        "feedback_agreed": sum(1 for _, _, agrees in feedback if agrees),
    }
    assert served.shadow.totals() == expected
    eventually(lambda: _newest_report(redis_client) == expected, 10, "the totals reported")
    metrics = served.client.get("/metrics")
    assert f'aftertune_answer_shadow_compared_total{{version="2"}} {len(QUESTIONS)}.0' in metrics
    assert f'aftertune_answer_shadow_agreed_total{{version="2"}} {same}.0' in metrics
    assert "aftertune_answer_shadow_version 2.0" in metrics


@pytest.mark.parametrize("served", [1], indirect=True)
def test_a_full_queue_drops_shadow_work_never_a_client_request(served: Served) -> None:
    code, batch = served.client.post("/v1/answer", {"records": QUESTIONS[:8] * 2})
    assert code == 200
    assert [a["version"] for a in batch["answers"]] == [1] * 16
    eventually(
        lambda: (
            "aftertune_answer_shadow_dropped_total" in served.client.get("/metrics")
            and "aftertune_answer_shadow_dropped_total 0.0" not in served.client.get("/metrics")
        )
    )


def test_the_candidate_withdrawn_or_refused_leaves_clients_untouched(
    served: Served, daemon: Daemon, state: Path
) -> None:
    daemon.announce[0] = None  # promoted or rejected: no candidate any more
    eventually(lambda: served.shadow.follower.bundle is None, 10, "the shadow stopped")
    assert served.shadow.totals() is None
    # A candidate whose bundle does not verify (a flipped byte) is refused.
    bad = publish_challenger(state / "bundles", 3)
    onnx = bad / "model.onnx.data"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 1
    onnx.write_bytes(bytes(data))
    daemon.announce[0] = 3
    code, one = served.client.post("/v1/answer", QUESTIONS[0])
    assert code == 200 and one["version"] == 1
    assert served.shadow.follower.bundle is None


def test_the_cli_shadows_the_announced_candidate_and_reports_it(
    state: Path, daemon: Daemon, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    consumer = tmp_path / "consumer"
    pull(DirSource(state), consumer)
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "aftertune.daemon.cli", "answer-server"),
            *("--bundle", str(consumer / "current"), "--port", str(port)),
            *("--shadow", daemon.url, "--shadow-rate", "1"),
        ],
        env={
            **os.environ,
            "AFTERTUNE_STATE_DIR": str(tmp_path / "s"),
            "AFTERTUNE_ANSWER_TOKEN": "",
            "AFTERTUNE_TOKEN": DAEMON_TOKEN,
            "AFTERTUNE_REDIS__URL": redis_url,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = Client(f"http://127.0.0.1:{port}", token=None)

    def answered() -> bool:
        try:
            code, got = client.post("/v1/answer", QUESTIONS[0])
        except OSError:
            return False
        return code == 200 and got["version"] == 1

    try:
        try:
            eventually(answered, 30, "the answer server answers")
            eventually(
                lambda: answered() and (_newest_report(redis_client) or {}).get("compared", 0) > 0,
                40,
                "a shadow report on the stream",
            )
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert (_newest_report(redis_client) or {})["version"] == 2
    assert "shadow: running v2 beside the champion" in err
    assert (tmp_path / "consumer" / "shadow" / "current").is_symlink()


def test_shadow_needs_the_daemons_redis() -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "aftertune.daemon.cli", "answer-server"),
            *("--bundle", "/nonexistent/current", "--shadow", "http://127.0.0.1:9"),
        ],
        env={k: v for k, v in os.environ.items() if k != "AFTERTUNE_REDIS__URL"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "--shadow reports to the daemon on its Redis: give --redis-url" in proc.stderr


def test_every_shadow_metric_is_documented_with_its_unit() -> None:
    import re

    registry = prometheus_client.CollectorRegistry()
    ShadowMetrics(registry)
    text = prometheus_client.generate_latest(registry).decode()
    families = {f for f in re.findall(r"^# TYPE (\S+) ", text, re.M) if not f.endswith("_created")}
    assert len(families) == 7
    operations = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    for family in families:
        row = re.search(rf"^\| `{family}(_total)?` \| \w+ \| (\w+) \|", operations, re.M)
        assert row is not None, f"{family} is not in docs/operations.md's answer-server table"
