"""The real daemon (`aftertune serve`) as a subprocess, against a real Redis and a real tiny
model: scheduled cycles, SIGHUP reload, warm stop and resume, kill -9 recovery, the systemd
watchdog over a real AF_UNIX datagram socket, and two daemons sharing one Redis and one state.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import cli_json, run_cli, write_jsonl

from aftertune.daemon.embedded_redis import free_port
from aftertune.store.bundles import latest_version, published
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import MANIFEST, verify_bundle
from aftertune.store.examples import ExampleStore
from aftertune.store.registry import Registry, VersionState

pytestmark = pytest.mark.slow

INSTRUCTION = "Is the number even or odd?"
STOP_TIMEOUT_S = 30.0  # cycle.shutdown_timeout_s: a warm stop never takes longer
CYCLE_TIMEOUT_S = 240.0  # generous upper bound for one cycle on two loaded cores


def parity(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct records of a task the tiny model learns in a few dozen steps."""
    numbers = random.Random(seed).sample(range(100_000), n)
    return [
        {
            "task": "parity",
            "instruction": INSTRUCTION,
            "input": str(number),
            "output": "even" if number % 2 == 0 else "odd",
        }
        for number in numbers
    ]


def daemon_env(redis_url: str, state: Path, port: int, **settings: str) -> dict[str, str]:
    """A hermetic environment: no AFTERTUNE_* or systemd variables from the caller's shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AFTERTUNE_")
        and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(
        {
            "AFTERTUNE_REDIS__URL": redis_url,
            "AFTERTUNE_STATE_DIR": str(state),
            "AFTERTUNE_SERVER__PORT": str(port),
            "AFTERTUNE_CYCLE__MIN_NEW_EXAMPLES": "100",
            "AFTERTUNE_CYCLE__CHECK_EVERY_S": "0.5",
            "AFTERTUNE_TRAIN__MAX_STEPS": "40",
            "AFTERTUNE_TRAIN__PROGRESS": "false",
            # These tests are about the daemon, not the gate: 40 steps teach parity little
            # (~64 % against a 61 % majority answer), which the chance rule would reject.
            "AFTERTUNE_GATE__BEAT_CHANCE": "false",
            "AFTERTUNE_LOG_FORMAT": "json",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(settings)
    return env


class Daemon:
    """One `aftertune serve` process; its JSON-lines log goes to a file the test reads."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...]) -> None:
        self.env = env
        self.port = int(env["AFTERTUNE_SERVER__PORT"])
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aftertune.daemon.cli", "serve", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            out.append(event if isinstance(event, dict) else {"level": "RAW", "msg": line})
        return out

    def messages(self, containing: str) -> list[str]:
        return [e["msg"] for e in self.events() if containing in str(e.get("msg", ""))]

    def stamps(self, containing: str) -> list[str]:
        """Timestamps (ISO 8601 UTC, so they sort as text) of the matching log lines."""
        return [e["ts"] for e in self.events() if containing in str(e.get("msg", "")) and "ts" in e]

    def stamp(self, containing: str) -> str:
        (found,) = self.stamps(containing)
        return found

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"--- log of pid {self.proc.pid} ---\n" + "\n".join(text[-lines:])

    def wait_log(self, containing: str, timeout: float = CYCLE_TIMEOUT_S) -> str:
        return wait_for(
            f"log line {containing!r}",
            lambda: next(iter(self.messages(containing)), None),
            timeout,
            self,
        )

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout}s\n{self.tail()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def wait_for(
    what: str,
    probe: Callable[[], Any],
    timeout: float,
    *daemons: Daemon,
    every: float = 0.2,
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail fast if a daemon dies."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        dead = [d for d in daemons if d.proc.poll() is not None]
        if dead:
            raise AssertionError(
                f"daemon exited ({dead[0].proc.returncode}) while waiting for {what}\n"
                + dead[0].tail()
            )
        if time.monotonic() > deadline:
            tails = "\n".join(d.tail() for d in daemons)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(every)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons; every one left running at the end is killed."""
    started: list[Daemon] = []

    def start(env: dict[str, str], *args: str) -> Daemon:
        daemon = Daemon(env, tmp_path / f"daemon-{len(started)}.log", args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def answers(url: str) -> bool:
    try:
        http_get(url)
    except (urllib.error.URLError, ConnectionError, OSError):
        return False
    return True


def wait_ready(daemon: Daemon, timeout: float = 120) -> None:
    def ready() -> bool:
        try:
            return http_get(daemon.url + "/readyz")[0] == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    wait_for(f"/readyz 200 on {daemon.url}", ready, timeout, daemon)


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus text exposition, None when absent."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def push(env: dict[str, str], path: Path, rows: list[dict[str, str]]) -> None:
    write_jsonl(path, rows)
    done = run_cli("push", str(path), env=env, timeout=60)
    assert done.returncode == 0, done.stderr


def status(env: dict[str, str]) -> dict[str, Any]:
    return cli_json("status", "--json", env=env, timeout=60)


def stored(env: dict[str, str]) -> int:
    return sum(c["train"] + c["test"] for c in status(env)["examples"].values())


def versions(state: Path) -> list[tuple[int, str, int | None]]:
    with Registry(state) as registry:
        return [(v.version, v.state.value, v.parent) for v in registry.versions()]


def champion(state: Path) -> int | None:
    with Registry(state) as registry:
        found = registry.champion()
        return found.version if found is not None else None


class NotifyListener:
    """What systemd sees: datagrams on an AF_UNIX socket, each kept with its arrival time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._halt.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        return [text for _, text in list(self.received)]

    def count(self, text: str, since: float, until: float) -> int:
        return sum(1 for at, got in list(self.received) if got == text and since <= at <= until)

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self.sock.close()


CONFIG = "[gate]\nmin_gain = 0.0\n\n[cycle]\nmin_new_examples = {min_new}\n"


def test_reload_lowers_the_threshold_then_a_scheduled_cycle_promotes_and_serves_the_bundle(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, spawn: Callable[..., Daemon]
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "aftertune.toml"
    config.write_text(CONFIG.format(min_new=100_000))
    env = daemon_env(redis_url, state, free_port())
    del env["AFTERTUNE_CYCLE__MIN_NEW_EXAMPLES"]  # the environment would beat the file
    daemon = spawn(env, "--config", str(config))
    wait_ready(daemon)
    assert http_get(daemon.url + "/healthz")[0] == 200

    push(env, tmp_path / "batch.jsonl", parity(300, seed=1))
    wait_for("300 examples stored", lambda: stored(env) == 300, 60, daemon)
    stored_at = time.monotonic()
    # Where producers push, and what was ingested, are logged with their figures as keys.
    (where,) = [e for e in daemon.events() if str(e.get("msg")).startswith("producers push")]
    assert (where["redis_url"], where["stream"]) == (redis_url, "aftertune:feedback")

    def ingest_lines() -> list[dict[str, Any]] | None:
        lines = [e for e in daemon.events() if "stored" in e and "dead_lettered" in e]
        return lines if sum(e["stored"] for e in lines) >= 300 else None

    # At most one line per 5 s: the 300 records may be told in one line or a few.
    ingested = wait_for("ingest log lines telling 300 stored", ingest_lines, 30, daemon)
    assert sum(e["stored"] for e in ingested) == 300
    assert len(ingested) <= 3
    running = status(env)["daemon"]
    assert running is not None and running["pid"] == daemon.proc.pid
    assert running["server"] == daemon.url

    config.write_text("[cycle]\nmin_new_examples = 0\n")
    daemon.send(signal.SIGHUP)
    refused = daemon.wait_log("reload refused", 30)
    assert "cycle.min_new_examples" in refused
    assert http_get(daemon.url + "/readyz")[0] == 200  # still up, still serving
    # 300 examples wait, far below 100000: at least 4 threshold checks (0.5 s) start nothing.
    time.sleep(max(0.0, 2.0 - (time.monotonic() - stored_at)))
    assert daemon.messages("cycle starting") == []
    train = status(env)["examples"]["parity"]["train"]  # the store holds some out for testing
    waiting = metric(http_get(daemon.url + "/metrics")[1], "aftertune_examples_waiting")
    assert 0 < train < 300 and waiting == train  # the threshold checks count them

    config.write_text(CONFIG.format(min_new=100))
    daemon.send(signal.SIGHUP)
    reloaded = daemon.wait_log("reloaded settings:", 30)
    assert reloaded.startswith("reloaded settings: cycle: ")
    assert '"min_new_examples": 100000' in reloaded and '"min_new_examples": 100,' in reloaded
    starting = daemon.wait_log("cycle starting", 60)
    assert re.fullmatch(r"cycle starting \(\d+ new examples\)", starting), starting
    assert http_get(daemon.url + "/readyz")[0] == 200  # the cycle runs beside the server
    daemon.wait_log("v1 promoted")

    def scraped_after_the_cycle() -> str | None:
        text = http_get(daemon.url + "/metrics")[1]
        promoted = metric(text, "aftertune_cycles_total", '{outcome="promoted"}')
        return text if promoted == 1.0 else None

    metrics = wait_for("the promoted cycle in /metrics", scraped_after_the_cycle, 30, daemon)
    assert metric(metrics, "aftertune_records_ingested_total") == 300.0
    assert metric(metrics, "aftertune_ready") == 1.0

    bundles = state / "bundles"
    assert latest_version(bundles) == 1
    bundle = published(bundles, 1)
    events = wait_for(
        "a promotion event", lambda: redis_client.xrange("aftertune:promotions"), 30, daemon
    )
    assert [(f[b"version"], f[b"manifest_sha256"].decode()) for _, f in events] == [
        (b"1", bundle.manifest_sha256)
    ]

    to = tmp_path / "consumer"
    pulled = run_cli("pull", "--server", daemon.url, "--to", str(to), "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    got = json.loads(pulled.stdout)
    assert (got["version"], got["manifest_sha256"], got["downloaded"]) == (
        1,
        bundle.manifest_sha256,
        True,
    )
    assert (to / "current").resolve() == (to / "v1").resolve()
    expected = Bundle.open(bundles / "latest").generate(instruction=INSTRUCTION, input="4242")
    generated = run_cli(
        "generate", "--bundle", str(to / "current"), "--instruction", INSTRUCTION,
        "--input", "4242", env=env,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == expected + "\n"

    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(STOP_TIMEOUT_S + 10) == 0
    # The whole log, a cycle included, is JSON lines: no progress bar, no stray line.
    assert [e["msg"] for e in daemon.events() if e["level"] == "RAW"] == []
    assert len(daemon.messages("serving HTTP on")) == 1
    assert not answers(daemon.url + "/healthz")
    assert status(env)["daemon"] is None
    assert versions(state) == [(1, "promoted", None)]


def test_watchdog_pings_through_training_and_a_warm_stop_resumes_from_its_checkpoint(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, spawn: Callable[..., Daemon]
) -> None:
    state = tmp_path / "state"
    short = Path(tempfile.mkdtemp(prefix="at-", dir="/tmp"))  # AF_UNIX paths: < 108 bytes
    listener = NotifyListener(str(short / "notify"))
    try:
        env = daemon_env(
            redis_url, state, free_port(),
            AFTERTUNE_TRAIN__MAX_STEPS="400", AFTERTUNE_TRAIN__CHECKPOINT_EVERY="10",
        )  # fmt: skip
        # WATCHDOG_PID unset: the watchdog is then this process's, as systemd allows.
        first = spawn({**env, "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"})
        wait_for("READY=1", lambda: "READY=1" in listener.messages(), 120, first)
        assert listener.messages()[0] == "READY=1"
        push(env, tmp_path / "batch.jsonl", parity(300, seed=2))

        def training() -> dict[str, Any] | None:
            cycle = (status(env)["daemon"] or {}).get("cycle") or {}
            running = cycle.get("running") and 0 < cycle.get("step", 0) < 400
            return cycle if running else None

        began = wait_for("the cycle training", training, CYCLE_TIMEOUT_S, first)
        since = time.monotonic()
        # A window of >= 3 s that ends while the cycle still trains.
        ended = wait_for(
            "3 s more of training",
            lambda: time.monotonic() - since >= 3 and training(),
            60,
            first,
        )
        until = time.monotonic()
        assert ended["step"] > began["step"]
        pings = listener.count("WATCHDOG=1", since, until)
        expected = (until - since) / 0.5  # WATCHDOG_USEC / 2
        assert pings >= 0.6 * expected, (pings, expected)
        assert any(
            m.startswith("STATUS=") and "cycle training" in m for m in listener.messages()
        ), listener.messages()

        asked = time.monotonic()
        first.send(signal.SIGTERM)
        assert first.wait_exit(STOP_TIMEOUT_S + 10) == 0
        # Training stops at its next step boundary, long before cycle.shutdown_timeout_s.
        assert time.monotonic() - asked < STOP_TIMEOUT_S / 2
        wait_for("STOPPING=1", lambda: "STOPPING=1" in listener.messages(), 5)
    finally:
        listener.close()
        shutil.rmtree(short, ignore_errors=True)
    interrupted = first.messages("cycle interrupted: training stopped at step")
    assert len(interrupted) == 1, first.tail()
    found = re.search(r"at step (\d+)", interrupted[0])
    assert found is not None, interrupted
    step = int(found.group(1))
    assert 0 < step < 400
    assert list(state.glob("work/train-*/checkpoints/*")), "no checkpoint left to resume from"
    assert redis_client.exists("aftertune:trainer") == 0  # a warm stop releases the lock
    assert versions(state) == []
    with ExampleStore.in_state_dir(state) as store:
        window = store.max_seq()
    # Records that arrive while the daemon is down (fewer than min_new_examples) must not
    # change the interrupted run's data window, or it could not resume from its checkpoint.
    push(env, tmp_path / "late.jsonl", parity(40, seed=9))
    assert run_cli("serve", "--burst", env=env).returncode == 0
    with ExampleStore.in_state_dir(state) as store:
        assert store.max_seq() > window

    second = spawn(env)
    assert second.wait_log("resuming at step").startswith(f"resuming at step {step}/400 ")
    second.wait_log("v1 promoted")
    with Registry(state) as registry:
        assert [(v.version, v.state) for v in registry.versions()] == [(1, VersionState.PROMOTED)]
        report = registry.get(1).training
        assert registry.get(1).data_seq == window  # the late records wait for the next cycle
    assert (report["resumed_from_step"], report["steps"]) == (step, 400)
    assert not list(state.glob("work/train-*/checkpoints/*"))
    wait_for("v1 published", lambda: latest_version(state / "bundles") == 1, 30, second)
    second.send(signal.SIGTERM)
    assert second.wait_exit(STOP_TIMEOUT_S + 10) == 0


def test_a_daemon_killed_during_evaluation_promotes_its_challenger_after_restart(
    redis_url: str, tmp_path: Path, spawn: Callable[..., Daemon]
) -> None:
    state = tmp_path / "state"
    # A kill -9 leaves the trainer lock to expire: a short TTL keeps the test short.
    env = daemon_env(redis_url, state, free_port(), AFTERTUNE_CYCLE__LOCK_TTL_S="5")
    doomed = spawn({**env, "AFTERTUNE_FAILPOINT": "cycle.during_eval"})
    wait_ready(doomed)
    push(env, tmp_path / "batch.jsonl", parity(300, seed=3))
    assert doomed.wait_exit(CYCLE_TIMEOUT_S) == -signal.SIGKILL
    assert versions(state) == [(1, "evaluating", None)]
    assert champion(state) is None and latest_version(state / "bundles") is None

    restarted = spawn(env)
    restarted.wait_log("resuming the cycle of v1 (evaluating)")
    restarted.wait_log("v1 promoted")
    assert versions(state) == [(1, "promoted", None)]
    assert champion(state) == 1
    wait_for("v1 published", lambda: latest_version(state / "bundles") == 1, 30, restarted)
    assert restarted.messages("trained on") == []  # evaluated again, not retrained
    restarted.send(signal.SIGTERM)
    assert restarted.wait_exit(STOP_TIMEOUT_S + 10) == 0


def test_two_daemons_share_redis_and_state_store_each_record_once_and_train_one_at_a_time(
    redis_url: str, tmp_path: Path, spawn: Callable[..., Daemon]
) -> None:
    state = tmp_path / "state"
    daemons = []
    for name in ("a", "b"):
        env = daemon_env(
            redis_url, state, free_port(),
            AFTERTUNE_REDIS__CONSUMER=f"daemon-{name}", AFTERTUNE_LOG_LEVEL="DEBUG",
        )  # fmt: skip
        daemons.append(spawn(env))
    for daemon in daemons:
        wait_ready(daemon)
    env = daemons[0].env
    # 150 distinct records (~135 train) sent three times: one cycle's worth, 300 duplicates.
    rows = parity(150, seed=4)
    for n in range(3):
        push(env, tmp_path / f"batch-{n}.jsonl", rows)

    def totals() -> tuple[float, float]:
        texts = [http_get(d.url + "/metrics")[1] for d in daemons]
        return (
            sum(metric(t, "aftertune_records_ingested_total") or 0 for t in texts),
            sum(metric(t, "aftertune_records_duplicate_total") or 0 for t in texts),
        )

    wait_for("450 entries ingested", lambda: totals() == (150.0, 300.0), 60, *daemons)
    assert stored(env) == 150
    assert status(env)["stream"]["pending"] == 0
    wait_for(
        "v1 promoted", lambda: any(d.messages("v1 promoted") for d in daemons), CYCLE_TIMEOUT_S,
        *daemons,
    )  # fmt: skip
    trainers = [d for d in daemons if d.messages("cycle starting")]
    assert len(trainers) == 1, [d.tail() for d in daemons]
    (trainer,) = trainers
    (other,) = [d for d in daemons if d is not trainer]
    assert len(trainer.messages("cycle starting")) == 1
    # While that cycle ran, the other daemon saw enough waiting examples and was kept out.
    began, ended = trainer.stamp("cycle starting"), trainer.stamp("v1 promoted")
    held_off = other.stamps("another daemon holds the trainer lock")
    assert any(began < ts < ended for ts in held_off), (began, ended, held_off)
    assert versions(state) == [(1, "promoted", None)]

    for daemon in daemons:
        daemon.send(signal.SIGTERM)
    for daemon in daemons:
        assert daemon.wait_exit(STOP_TIMEOUT_S + 10) == 0
    assert other.messages("cycle starting") == []
    assert versions(state) == [(1, "promoted", None)]


def test_a_second_sigterm_cuts_short_a_warm_stop_that_waits_for_evaluation(
    redis_url: str, tmp_path: Path, spawn: Callable[..., Daemon]
) -> None:
    state = tmp_path / "state"
    # Evaluation and export do not stop at step boundaries; ~100 held-out examples scored
    # one at a time make them last several seconds.
    env = daemon_env(redis_url, state, free_port(), AFTERTUNE_EVAL__BATCH_SIZE="1")
    daemon = spawn(env)
    wait_ready(daemon)
    push(env, tmp_path / "batch.jsonl", parity(1000, seed=5))
    daemon.wait_log("candidate v1 trained")
    daemon.send(signal.SIGTERM)
    daemon.wait_log("worker stopped", 30)
    assert daemon.proc.poll() is None  # the warm stop waits for the evaluating cycle
    asked = time.monotonic()
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(STOP_TIMEOUT_S + 10) == 0
    assert time.monotonic() - asked < 5.0, daemon.tail()
    assert daemon.messages("cycle still running after")
    assert daemon.messages("v1 promoted") == []
    # Left for the next start to evaluate again (see the kill -9 test).
    assert [(v, s) for v, s, _ in versions(state)] in ([(1, "evaluating")], [(1, "candidate")])


def _promote_by_hand(state: Path, base_dir: Path, workdir: Path) -> None:
    """v1 as the champion without a training run: an adapter with non-zero B made on the base
    (as tests/test_champion.py makes them), registered and promoted as a cycle would. torch
    is imported here, not at the top: the other tests drive the daemon from outside."""
    import torch
    from spec_fixtures import lora_spec

    from aftertune.learners.base_model import load_base
    from aftertune.learners.lora import attach_fresh_adapter, save_adapter

    model, _ = load_base(base_dir, dtype=torch.float32)
    torch.manual_seed(7)
    peft_model = attach_fresh_adapter(model, lora_spec(r=4, target_modules=("q_proj", "down_proj")))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = save_adapter(peft_model, workdir / "adapter")
    with ExampleStore.in_state_dir(state) as store, Registry(state) as registry:
        v = registry.register_candidate(
            adapter, parent=None, data_seq=store.max_seq(), training={}, lineage={}
        )
        registry.transition(v.version, VersionState.EVALUATING, actor="test", reason="gate")
        registry.promote(v.version, actor="test", reason="made by hand")


def test_a_corrupt_champion_bundle_goes_out_of_service_and_is_exported_again(
    redis_url: str, tmp_path: Path, spawn: Callable[..., Daemon]
) -> None:
    from aftertune.learners.base_model import EMBEDDED_TINY, resolve_base

    state = tmp_path / "state"
    bundles = state / "bundles"
    env = daemon_env(redis_url, state, free_port())
    # Held-out examples for the export's parity check, ingested before the champion exists.
    write_jsonl(tmp_path / "few.jsonl", parity(80, seed=9))
    assert run_cli("push", str(tmp_path / "few.jsonl"), env=env).returncode == 0
    assert run_cli("serve", "--burst", env=env).returncode == 0
    _promote_by_hand(state, resolve_base(EMBEDDED_TINY), tmp_path)

    daemon = spawn(env)
    wait_ready(daemon)
    # The start-up run finds the champion without a bundle and exports it.
    wait_for("v1 published", lambda: latest_version(bundles) == 1, CYCLE_TIMEOUT_S, daemon)
    first = verify_bundle(bundles / "latest")
    assert first["version"] == 1 and first["adapters"][-1]["version"] == 1
    data = max(bundles.joinpath("v1").iterdir(), key=lambda p: p.stat().st_size)
    assert data.name != MANIFEST

    flip = bytearray(data.read_bytes())
    flip[len(flip) // 2] ^= 0x01
    data.write_bytes(bytes(flip))
    # A pull asks for the file: never served, the bundle goes out of service, a repair starts.
    to = tmp_path / "consumer"
    failed = run_cli("pull", "--server", daemon.url, "--to", str(to), env=env)
    assert failed.returncode != 0 and not (to / "current").exists()
    daemon.wait_log("bundle v1 is damaged and out of service", 30)
    assert (bundles / ".damaged-v1" / data.name).read_bytes() == bytes(flip)  # kept as found
    daemon.wait_log("champion v1 has no whole bundle; exporting it again", 60)

    wait_for("v1 published again", lambda: latest_version(bundles) == 1, CYCLE_TIMEOUT_S, daemon)
    again = verify_bundle(bundles / "latest")
    assert again["version"] == 1 and again["adapters"] == first["adapters"]
    assert again["files"] == first["files"]  # the same model, byte for byte
    text = http_get(daemon.url + "/metrics")[1]
    assert metric(text, "aftertune_bundles_damaged_total") == 1.0

    pulled = run_cli("pull", "--server", daemon.url, "--to", str(to), "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["version"] == 1
    assert verify_bundle(to / "current")["files"] == first["files"]
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(STOP_TIMEOUT_S + 10) == 0
