"""``aftertune demo``: the whole loop on an embedded base, in a few minutes, then a summary.

It starts the real daemon (``aftertune serve``: embedded Redis, an embedded base, the HTTP
server) in a fresh state dir, pushes feedback for a first task (or two), then another task,
then a poisoned batch (a known task with flipped labels on fresh inputs), and waits for each
decision: two promotions and a rejection. It pulls the latest bundle over HTTP, answers a few
prompts with ONNX Runtime, prints versions, decisions with the gate's figures, per-task
accuracy before and after, timings, writes the HTML report, and stops the daemon (SIGTERM),
leaving no process behind.

Two scenarios: ``embedded:minilm`` (the default, what ``make run`` runs) learns real text, a
news-topic task then an emotion task, from ``demo_data/real``; ``embedded:tiny``
(``make run-tiny``) learns character puzzles.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aftertune.daemon.embedded_redis import free_port, redis_connection
from aftertune.daemon.errors import DaemonError
from aftertune.daemon.settings import Settings
from aftertune.store.consumer.producer import Producer
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry, Version, VersionState

DECIDED = (VersionState.PROMOTED, VersionState.REJECTED, VersionState.RETIRED)
SHOW_EVERY_S = 10.0  # while waiting, what the cycle does is printed this often


@dataclass(frozen=True)
class Scenario:
    """What the demo pushes for one base, and the prompts it answers at the end."""

    steps: tuple[tuple[str, tuple[str, ...], bool], ...]  # (what, tasks to push, poisoned?)
    prompts: tuple[tuple[str, str, str, str], ...]  # (task, instruction, input, right answer)
    rows: Callable[[str], list[dict[str, Any]]]
    poison: Callable[[], list[dict[str, Any]]]
    env: dict[str, str]  # AFTERTUNE_* settings of the daemon
    # Under the state dir, wiped at start: one per base, so that `make run-tiny` keeps
    # what `make run` left (its report above all), and the other way round.
    folder: str = "demo"
    # torch threads of the daemon unless OMP_NUM_THREADS is set; None: torch's default
    # (every core). The tiny demo keeps 1, as its figures in docs/benchmarks.md were taken.
    threads: int | None = 1
    note: str = ""  # said at the start: where the demo's settings differ from a daemon's


# Steps: (what the user sees, files to push, poisoned?)
STEPS = (
    ("feedback for two new tasks: parity, vowel_end", ("parity", "vowel_end"), False),
    ("a third task: last_digit", ("last_digit",), False),
    ("a poisoned batch: parity with flipped labels", (), True),
)
PROMPTS = (  # (task, instruction, input, the right answer)
    ("parity", "Is the number even or odd?", "4172", "even"),
    ("parity", "Is the number even or odd?", "93", "odd"),
    ("vowel_end", "Does the word end with a vowel? Answer yes or no.", "banana", "yes"),
    ("vowel_end", "Does the word end with a vowel? Answer yes or no.", "market", "no"),
    ("last_digit", "What is the last digit of the number?", "8306", "6"),
)


def _rows(task: str, folder: str = "", train: int | None = None) -> list[dict[str, Any]]:
    """A shipped task's records (``train``: the first N train lines only), split marked."""
    rows = []
    data = resources.files("aftertune.daemon") / "demo_data"
    if folder:
        data = data / folder
    for split in ("train", "test"):
        lines = (data / f"{task}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
        lines = lines[:train] if split == "train" and train is not None else lines
        rows += [{**json.loads(line), "split": split} for line in lines if line]
    return rows


# The real-text demo's sizes, to fit `make run` (install included) in 3 minutes on 2 cores
# (docs/benchmarks.md): 80 train records a task are enough for MiniLM to learn agnews and
# sni_emotion; every held-out line (100 a task) is pushed, so the gate judges on as many
# records as the files have; 54 poisoned train records against 80 clean ones cost agnews
# 13 to 18 points. 100 and 80 cost the demo 16 % more CPU, 64 and 50 saved 10 % and lost
# answers.
REAL_TRAIN = 80  # agnews and sni_emotion train records pushed; the poison follows them
REAL_POISON = 60  # fresh agnews records with flipped labels (one in ten held out)
# The demo's own cycle settings, beside the product's defaults (2 passes, a Fisher of 64): on
# the idle 2-core machine they took the demo from 140 to 103 s, sni_emotion learned 40 -> 51 %
# instead of 39 -> 58 %.
REAL_CYCLE = {
    "AFTERTUNE_TRAIN__EPOCHS": "1",
    "AFTERTUNE_EWC__FISHER_SAMPLES": "32",
    "AFTERTUNE_EXPORT__PARITY_PROMPTS": "16",
}


def _real_poison() -> list[dict[str, Any]]:
    """agnews records the demo never pushed, each labelled with the next topic (flipped)."""
    data = resources.files("aftertune.daemon") / "demo_data" / "real"
    lines = (data / "agnews.train.jsonl").read_text(encoding="utf-8").splitlines()
    lines = lines[REAL_TRAIN : REAL_TRAIN + REAL_POISON]
    topics = ["World", "Sports", "Business", "Science or Technology"]
    rows = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        wrong = topics[(topics.index(row["output"]) + 1) % len(topics)]
        split = "test" if i % 10 == 0 else "train"
        rows.append({**row, "output": wrong, "split": split, "source": "demo-poison"})
    return rows


def _real_prompts() -> tuple[tuple[str, str, str, str], ...]:
    out = []
    for task in ("agnews", "sni_emotion"):
        for row in [r for r in _rows(task, "real", 0) if r["split"] == "test"][:3]:
            out.append((task, row["instruction"], row["input"], row["output"]))
    return tuple(out)


def _poison(n: int = 300, seed: int = 99) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        number = rng.randrange(10**6, 10**7)  # longer than every shipped input: fresh
        rows.append(
            {
                "task": "parity",
                "instruction": "Is the number even or odd?",
                "input": str(number),
                "output": "odd" if number % 2 == 0 else "even",
                "split": "test" if i % 10 == 0 else "train",
                "source": "demo-poison",
            }
        )
    return rows


def scenario(base: str) -> Scenario:
    """The demo's scenario for ``base``: embedded:tiny or embedded:minilm."""
    if base == "embedded:tiny":
        return Scenario(
            STEPS, PROMPTS, _rows, _poison, {"AFTERTUNE_CYCLE__MIN_NEW_EXAMPLES": "200"}
        )
    if base == "embedded:minilm":
        return Scenario(
            steps=(
                ("a news-topic task: agnews", ("agnews",), False),
                ("an emotion task: sni_emotion", ("sni_emotion",), False),
                ("a poisoned batch: agnews with flipped labels", (), True),
            ),
            prompts=_real_prompts(),
            rows=lambda task: _rows(task, "real", REAL_TRAIN),
            poison=_real_poison,
            env={
                "AFTERTUNE_MODEL__BASE": base,
                "AFTERTUNE_CYCLE__MIN_NEW_EXAMPLES": str(REAL_POISON * 9 // 10),
                **REAL_CYCLE,
            },
            folder="demo-minilm",
            threads=None,
            note="to fit in 3 minutes, this demo trains one pass over each batch (the kind's"
            " default: train.epochs 2) and estimates EWC's Fisher on 32 examples (default 64)",
        )
    raise DaemonError(f"the demo runs on embedded:tiny or embedded:minilm, not {base!r}")


class Demo:
    def __init__(self, settings: Settings, timeout_s: float, name: str = "demo") -> None:
        self.state = settings.state_dir.resolve() / name
        self.port = free_port()
        self.timeout_s = timeout_s
        self.daemon: subprocess.Popen[bytes] | None = None
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def start_daemon(self, threads: int | None = 1, **settings: str) -> None:
        """Start ``aftertune serve`` in a wiped state dir; ``settings``: extra AFTERTUNE_* env,
        ``threads``: torch's threads unless OMP_NUM_THREADS is set (None: torch's default)."""
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        env = {
            **os.environ,
            "AFTERTUNE_STATE_DIR": str(self.state),
            "AFTERTUNE_SERVER__PORT": str(self.port),
            "AFTERTUNE_CYCLE__CHECK_EVERY_S": "1",
            "AFTERTUNE_TRAIN__PROGRESS": "false",
            **settings,
        }
        if threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        # Waiting threads sleep instead of spinning: with another job on one of 2 cores, a
        # MiniLM training step at 2 threads took 1.3 to 5.2 s spinning, 0.5 to 0.6 s passive
        # (1 thread: 0.4 to 0.6 s; docs/benchmarks.md)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.pop("AFTERTUNE_REDIS__URL", None)  # the demo runs on the embedded Redis
        log = open(self.state / "daemon.log", "wb")  # noqa: SIM115  closed with the process
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "aftertune.daemon.cli", "serve", "--log-level", "INFO"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self._wait(self._ready, "the daemon to be ready")
        self.say(f"daemon up (pid {self.daemon.pid}), serving http://127.0.0.1:{self.port}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _wait(self, done: Any, what: str) -> Any:
        deadline = time.monotonic() + self.timeout_s
        since, shown = time.time(), ("", 0.0)
        while time.monotonic() < deadline:
            shown = self._show_cycle(since, shown)
            if self.daemon is not None and self.daemon.poll() is not None:
                raise DaemonError(
                    f"the daemon exited ({self.daemon.returncode}) while waiting for {what}; "
                    f"see {self.state / 'daemon.log'}"
                )
            found = done()
            if found:
                return found
            time.sleep(0.5)
        raise DaemonError(f"timed out after {self.timeout_s:.0f}s waiting for {what}")

    def _show_cycle(self, since: float, shown: tuple[str, float]) -> tuple[str, float]:
        """Say what the daemon's cycle started after ``since`` does now (its status file):
        when its phase changes, and every SHOW_EVERY_S while it stays in one."""
        try:
            cycle = json.loads(StateLayout(self.state).daemon_status.read_text()).get("cycle", {})
        except (OSError, ValueError, AttributeError):
            return shown
        if not cycle.get("running") or cycle.get("started_at", 0) < since:
            return shown
        state, now = str(cycle["state"]), time.monotonic()
        phase = state.split(" ")[0]
        if phase != shown[0].split(" ")[0] or now - shown[1] >= SHOW_EVERY_S:
            self.say(f"cycle: {state}")
            return state, now
        return shown

    def push(self, rows: list[dict[str, Any]]) -> None:
        with redis_connection(None, self.state) as client:
            Producer(client=client).push(rows)

    def decided(self, version: int) -> Version | None:
        with Registry(self.state) as registry:
            versions = {v.version: v for v in registry.versions()}
        found = versions.get(version)
        return found if found is not None and found.state in DECIDED else None

    def stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()


def run_demo(settings: Settings, *, timeout_s: float = 300.0, base: str = "embedded:minilm") -> int:
    """Run the demo; returns 0 when it saw two promotions, a rejection and answers."""
    plan = scenario(base)
    demo = Demo(settings, timeout_s, name=plan.folder)
    timings: dict[int, float] = {}
    try:
        demo.start_daemon(plan.threads, **plan.env)
        if plan.note:
            demo.say(plan.note)
        for number, (what, tasks, poisoned) in enumerate(plan.steps, start=1):
            rows = plan.poison() if poisoned else [r for t in tasks for r in plan.rows(t)]
            demo.say(f"push {len(rows)} records: {what}")
            started = time.monotonic()
            demo.push(rows)
            version = demo._wait(lambda n=number: demo.decided(n), f"the decision on v{number}")
            timings[number] = time.monotonic() - started
            demo.say(f"v{number} {version.state.value}: {'; '.join(_why(version))}")
        answers = _pull_and_answer(demo, plan.prompts)
        outcomes = _summary(demo, timings, answers)
    finally:
        demo.stop_daemon()
        demo.say("daemon stopped")
    expected = ["promoted", "promoted", "rejected"]
    if outcomes != expected:
        print(f"unexpected decisions {outcomes}, expected {expected}", file=sys.stderr)
        return 1
    return 0


def _pull_and_answer(
    demo: Demo, prompts: tuple[tuple[str, str, str, str], ...]
) -> list[tuple[str, str, str, str]]:
    from aftertune.daemon.tables import size
    from aftertune.store.consumer import Bundle
    from aftertune.store.consumer.pull import HttpSource, pull

    pulled = pull(HttpSource(f"http://127.0.0.1:{demo.port}"), demo.state / "consumer")
    demo.say(f"pulled v{pulled.version} over HTTP: {size(pulled.bytes)}, every sha256 verified")
    bundle = Bundle.open(demo.state / "consumer" / "current")
    return [
        (task, text, bundle.answer(task, instruction, text), want)
        for task, instruction, text, want in prompts
    ]


def _why(version: Version) -> list[str]:
    """What the gate said: a rejection's reasons; for a promotion, its accuracy checks with
    their figures (what beat chance, what held), not just "all checks passed"."""
    if version.state is VersionState.REJECTED:
        return list(version.gate.get("reasons", []))
    checks = version.gate.get("checks", [])
    figures = [c["message"] for c in checks if c.get("metric") == "accuracy" and c.get("passed")]
    return figures or list(version.gate.get("reasons", []))


def _before_after(version: Version) -> str:
    """Each task's held-out accuracy before (the champion) and after (this version)."""
    rows = []
    for task, m in sorted(version.metrics.items()):
        # The figure the gate judges a task on: its earlier held-out records when it has any
        # (a poisoned batch's own held-out part cannot vouch for it), else the new ones.
        suites = m.get("suites", {})
        suite = suites.get("regression") or suites.get("gain") or m
        old, new = suite.get("champion", {}), suite.get("challenger", {})
        if "accuracy" in new:
            rows.append(
                f"{task} {100 * old.get('accuracy', 0):.0f}% -> {100 * new['accuracy']:.0f}%"
            )
    return ", ".join(rows) or "-"


def _summary(
    demo: Demo, timings: dict[int, float], answers: list[tuple[str, str, str, str]]
) -> list[str]:
    """Print the table; returns each version's decision, in order."""
    from aftertune.daemon.report import render_report
    from aftertune.daemon.tables import seconds, table

    with Registry(demo.state) as registry:
        versions = registry.versions()
        champion = registry.champion()
        page = render_report(registry, None)
    report = demo.state / "report.html"
    report.write_text(page, encoding="utf-8")
    rows = []
    for v in versions:
        mark = "*" if champion is not None and v.version == champion.version else " "
        decision = "promoted" if v.state is VersionState.RETIRED else v.state.value
        rows.append(
            [f"{mark}v{v.version}", decision, seconds(timings.get(v.version)), _before_after(v)]
        )
    print()
    header = "accuracy on earlier held-out records (champion -> challenger)"
    print(table(["version", "decision", "cycle", header], rows))
    for v in versions:
        for reason in _why(v)[:3]:
            print(f"  v{v.version}: {reason}")
    print("\nanswers from the pulled bundle (ONNX Runtime, no torch):")
    for task, text, answer, want in answers:
        mark = "right" if answer.strip() == want else f"wrong, expected {want!r}"
        shown = text if len(text) <= 40 else text[:37] + "..."
        print(f"  {task:<11} {shown!r:<44} -> {answer!r:<8} {mark}")
    print(f"\nHTML report: {report}")
    print(f"state dir:   {demo.state} (daemon log: {demo.state / 'daemon.log'})")
    return ["promoted" if v.state is VersionState.RETIRED else v.state.value for v in versions]
