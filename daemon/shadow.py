"""Shadow evaluation on the answer server: the challenger the daemon is judging answers a
sample of live requests beside the champion, off the request path.

The request path only offers what it served (``offer``: a coin flip per record and a
``put_nowait`` on a bounded queue; when the queue is full the record is not shadowed and
``aftertune_answer_shadow_dropped_total`` counts it) and hands over feedback (``feedback``:
one dictionary lookup). A background thread answers the queued records with the candidate
and compares; nothing it does can change, slow down or fail what a client is answered, except
for the CPU the candidate's answers take (``--shadow-rate`` of the traffic at most).

What is counted, per candidate bundle (answers compared after trimming surrounding spaces):

- ``compared``/``agreed``: records both answered; the candidate's answer equal to the
  champion's;
- ``feedback``/``feedback_agreed``: feedback on a shadowed answer, counted once per answer;
  the candidate agrees with a correction when it gave the corrected answer, with a thumbs-up
  when it gave the champion's (confirmed) answer, with a thumbs-down when it gave another one.

The totals are on ``/metrics`` and go to the daemon as reports on ``redis.shadow_stream``
(``store/shadow.py``) every ``report_every_s`` while they change.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import prometheus_client
import redis
from prometheus_client import Counter, Gauge

from aftertune.daemon.answer_log import Served
from aftertune.daemon.shadow_candidate import CandidateFollower
from aftertune.store.consumer import Bundle
from aftertune.store.shadow import ShadowReport

log = logging.getLogger(__name__)

POLL_S = 10.0  # how often the daemon is asked which candidate is in shadow evaluation
REPORT_EVERY_S = 5.0  # how often changed totals are reported
QUEUE = 1024  # records waiting for the candidate; more are not shadowed
KEEP = 100_000  # shadowed answers kept for feedback (as many as answer ids by default)
BATCH = 32  # records per candidate call
MAXLEN = 10_000  # approximate cap of the reports stream


@dataclass(frozen=True)
class ShadowSpec:
    """What shadowing is told: the daemon (``server``, ``token``), the sampled share of
    records (``rate``), where the candidate is pulled (``to_dir``), where reports go."""

    server: str
    token: str | None
    rate: float
    to_dir: Path
    redis_url: str
    stream: str
    poll_s: float = POLL_S
    report_every_s: float = REPORT_EVERY_S
    queue: int = QUEUE
    keep: int = KEEP

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"--shadow-rate must be above 0 and at most 1, got {self.rate:g}")
        if self.poll_s <= 0 or self.report_every_s <= 0 or self.queue < 1 or self.keep < 1:
            raise ValueError("poll_s and report_every_s must be above 0, queue and keep 1")


class ShadowMetrics:
    """The shadow's figures on the answer server's registry (docs/operations.md)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        def counter(name: str, text: str) -> Counter:
            return Counter(f"aftertune_answer_shadow_{name}", text, ["version"], registry=registry)

        self.version = Gauge(
            "aftertune_answer_shadow_version",
            "Version of the candidate shadowed now (0: none)",
            registry=registry,
        )
        self.compared = counter("compared", "Records the candidate answered beside the champion")
        self.agreed = counter("agreed", "Of those, the candidate's answer equal to the champion's")
        self.feedback = counter("feedback", "Feedback received on a shadowed answer")
        self.feedback_agreed = counter("feedback_agreed", "Of those, the candidate agreed")
        self.dropped = Counter(
            "aftertune_answer_shadow_dropped",
            "Sampled records not shadowed: the candidate's queue was full",
            registry=registry,
        )
        self.failed = Counter(
            "aftertune_answer_shadow_failed",
            "Sampled records the candidate failed to answer",
            registry=registry,
        )


@dataclass
class _Totals:
    """One candidate bundle's running totals on this server."""

    version: int
    manifest_sha256: str
    compared: int = 0
    agreed: int = 0
    feedback: int = 0
    feedback_agreed: int = 0


@dataclass(frozen=True)
class _Shadowed:
    version: int
    candidate: str
    champion: str


def same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def agrees_with_feedback(
    candidate: str, champion: str, correction: str | None, rating: str | None
) -> bool:
    """Whether the candidate's answer agrees with the feedback on the champion's."""
    if correction is not None:
        return same(candidate, correction)
    if rating == "up":
        return same(candidate, champion)
    return not same(candidate, champion)  # down: the champion's answer was wrong


class Shadow:
    """The candidate beside the champion: sampled, answered, compared, counted, reported."""

    def __init__(
        self,
        spec: ShadowSpec,
        metrics: ShadowMetrics,
        *,
        server_id: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.spec = spec
        self.metrics = metrics
        self.server_id = server_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.follower = CandidateFollower(spec.server, spec.token, spec.to_dir)
        self.champion_version = 0  # the version the clients were last answered with
        self._rng = random.Random(seed)
        self._queue: queue.Queue[Served] = queue.Queue(spec.queue)
        self._answers: OrderedDict[str, _Shadowed] = OrderedDict()
        self._totals: _Totals | None = None
        self._sent: _Totals | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client = redis.Redis.from_url(spec.redis_url, socket_timeout=10)
        self._report_failing = False

    # --- the request path: never blocks, never raises

    def offer(self, served: Sequence[Served]) -> None:
        """Queue a sampled share of what was just served for the candidate."""
        if self.follower.bundle is None:
            return
        for one in served:
            self.champion_version = one.version
            if self._rng.random() >= self.spec.rate:
                continue
            try:
                self._queue.put_nowait(one)
            except queue.Full:
                self.metrics.dropped.inc()

    def feedback(self, answer_id: str, correction: str | None, rating: str | None) -> None:
        """Feedback on ``answer_id``: counted when the candidate shadowed that answer."""
        with self._lock:
            shadowed = self._answers.pop(answer_id, None)
            totals = self._totals
            if shadowed is None or totals is None or shadowed.version != totals.version:
                return
            agreed = agrees_with_feedback(shadowed.candidate, shadowed.champion, correction, rating)
            totals.feedback += 1
            totals.feedback_agreed += agreed
        label = str(totals.version)
        self.metrics.feedback.labels(label).inc()
        if agreed:
            self.metrics.feedback_agreed.labels(label).inc()

    # --- the background threads

    def start(self) -> None:
        for name, target in (("shadow-follow", self._follow), ("shadow-answer", self._answer)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop both threads; the last totals are reported first."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.report_once()
        self._client.close()

    def _follow(self) -> None:
        next_poll = next_report = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                self.follow_once()
                next_poll = time.monotonic() + self.spec.poll_s
            if now >= next_report:
                self.report_once()
                next_report = time.monotonic() + self.spec.report_every_s
            self._stop.wait(max(0.05, min(next_poll, next_report) - time.monotonic()))

    def follow_once(self) -> None:
        """Ask the daemon for its candidate once; start new totals when it changed."""
        if not self.follower.check():
            return
        bundle, announced = self.follower.bundle, self.follower.announced
        with self._lock:
            self._answers.clear()
            self._totals = (
                _Totals(announced.version, announced.manifest_sha256)
                if bundle is not None and announced is not None
                else None
            )
        self.metrics.version.set(bundle.version if bundle is not None else 0)

    def _answer(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.answer_batch(batch)

    def answer_batch(self, batch: Sequence[Served]) -> None:
        """The candidate's answers to ``batch``, compared with the champion's and counted."""
        bundle = self.follower.bundle
        if bundle is None:
            return
        try:
            given = bundle.answer_many([(s.task, s.instruction, s.input) for s in batch], BATCH)
        except Exception as exc:  # a request the candidate cannot answer: counted, not fatal
            self.metrics.failed.inc(len(batch))
            log.debug(
                "shadow: v%d failed to answer %d records: %s", bundle.version, len(batch), exc
            )
            return
        self._count(bundle, batch, given)

    def _count(self, bundle: Bundle, batch: Sequence[Served], given: Sequence[str]) -> None:
        with self._lock:
            totals = self._totals
            if totals is None or totals.version != bundle.version:
                return  # the candidate changed meanwhile: these count for nobody
            agreed = 0
            for served, text in zip(batch, given, strict=True):
                agreed += same(text, served.answer)
                self._answers[served.answer_id] = _Shadowed(bundle.version, text, served.answer)
            while len(self._answers) > self.spec.keep:
                self._answers.popitem(last=False)
            totals.compared += len(batch)
            totals.agreed += agreed
        self.metrics.compared.labels(str(bundle.version)).inc(len(batch))
        self.metrics.agreed.labels(str(bundle.version)).inc(agreed)

    def report_once(self) -> None:
        """Send the totals to the daemon when they changed since the last report."""
        with self._lock:
            totals = replace(self._totals) if self._totals is not None else None
        if totals is None or totals == self._sent:
            return
        report = ShadowReport(
            server=self.server_id,
            version=totals.version,
            manifest_sha256=totals.manifest_sha256,
            champion_version=self.champion_version,
            compared=totals.compared,
            agreed=totals.agreed,
            feedback=totals.feedback,
            feedback_agreed=totals.feedback_agreed,
            sent_at=time.time(),
        )
        try:
            self._client.xadd(
                self.spec.stream, dict(report.fields()), maxlen=MAXLEN, approximate=True
            )
        except redis.RedisError as exc:
            if not self._report_failing:
                log.warning("shadow: report not sent to %s (%s); retrying", self.spec.stream, exc)
                self._report_failing = True
            return
        self._report_failing = False
        self._sent = totals

    def totals(self) -> dict[str, int] | None:
        """This server's totals for the candidate now (None: no candidate)."""
        with self._lock:
            t = self._totals
            if t is None:
                return None
            return {
                "version": t.version,
                "compared": t.compared,
                "agreed": t.agreed,
                "feedback": t.feedback,
                "feedback_agreed": t.feedback_agreed,
            }
