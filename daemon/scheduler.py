"""When to learn: APScheduler looks at the store; one cycle at a time runs in its own thread.

Two jobs decide (APScheduler 3, background thread, UTC):

* ``threshold`` every ``cycle.check_every_s``: start when ``cycle.min_new_examples`` new
  train examples wait (newer than the champion and than the last attempt that did not
  promote, so a failing batch is not retrained in a tight loop);
* ``interval`` every ``cycle.interval_s``: start when any example waits;
* ``shadow`` every ``cycle.check_every_s`` while a challenger is in shadow evaluation: its
  answer servers' reports are judged (``shadow_judge.py``), which may promote or reject it.

A cycle starts only while this daemon holds the Redis trainer lock, and runs in a daemon
thread so ingest, the HTTP server and watchdog pings never wait for it. A warm stop asks the
training loop to checkpoint and stop at its next step; a cycle killed outright resumes at the
next start (training from its checkpoint, a left challenger re-evaluated).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from aftertune.daemon.announce import announce_latest
from aftertune.daemon.metrics import DaemonMetrics
from aftertune.daemon.settings import CycleSettings, Settings
from aftertune.daemon.shadow_judge import candidate_version, judge_shadow
from aftertune.daemon.trainer_lock import TrainerLock
from aftertune.learners.errors import (
    CycleBlocked,
    LearnerError,
    NothingToTrain,
    TrainingInterrupted,
)
from aftertune.store.examples import ExampleStore
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry

log = logging.getLogger(__name__)

REPAIR = "bundle repair"  # a run that repairs publication, and trains only if a cycle is due
SHADOW = "shadow evaluation"  # a run that judges live-traffic reports, and never trains


@dataclass
class CycleProgress:
    running: bool = False
    reason: str = ""
    started: float = 0.0
    step: int = 0
    total_steps: int | None = None
    last_outcome: str = ""

    def describe(self) -> str:
        if not self.running:
            return f"last cycle {self.last_outcome}" if self.last_outcome else "no cycle yet"
        if self.total_steps and self.step < self.total_steps:
            share = 100 * self.step // self.total_steps
            return f"training {share}% (step {self.step} of {self.total_steps})"
        return "evaluating and publishing" if self.step else "preparing"


class CycleScheduler:
    def __init__(
        self,
        settings: Callable[[], Settings],
        client: redis.Redis,
        metrics: DaemonMetrics,
    ) -> None:
        self._settings = settings  # read at every decision: SIGHUP reloads take effect
        self._client = client
        self._metrics = metrics
        self._lock = TrainerLock(
            client, settings().cycle.lock_ttl_s, owner=settings().redis.consumer
        )
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempted_seq = 0  # max seq seen by the last cycle that did not promote
        self.progress = CycleProgress()
        self._repair = threading.Event()  # a published bundle went out of service
        self._scheduler = BackgroundScheduler(timezone="UTC")

    # --- lifecycle

    def start(self) -> None:
        import aftertune.daemon.learning  # noqa: F401  torch loads now, not inside a job

        self._schedule(self._settings().cycle)
        self._scheduler.start()
        self._begin("start-up")  # recover publication; resume an interrupted cycle

    def _schedule(self, cycle: CycleSettings) -> None:
        for job, seconds, check in (
            ("threshold", cycle.check_every_s, self._check_threshold),
            ("interval", cycle.interval_s, self._check_interval),
            ("shadow", cycle.check_every_s, self._check_shadow),
        ):
            self._scheduler.add_job(
                check,
                IntervalTrigger(seconds=seconds),
                id=job,
                replace_existing=True,
                max_instances=1,
                coalesce=True,
            )

    def reschedule(self, cycle: CycleSettings) -> None:
        """Apply new ``cycle.*`` timings (SIGHUP)."""
        self._schedule(cycle)

    def stop(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Stop deciding; ask a running cycle to stop at a checkpoint. True if none is left.

        Waits up to ``timeout_s`` for it, and no longer once ``give_up()`` holds (a second
        SIGTERM arriving during the wait: its handler can only set a flag).
        """
        self._stop.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        thread = self._thread
        if thread is not None:
            started = time.monotonic()
            deadline = started + timeout_s
            while thread.is_alive() and not give_up() and time.monotonic() < deadline:
                thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
            if thread.is_alive():
                log.warning(
                    "cycle still running after %.1fs; it resumes at next start",
                    time.monotonic() - started,
                )
                return False
        return True

    # --- decisions

    def waiting(self) -> tuple[int, int, float]:
        """(train examples newer than the champion, of those newer than the last attempt, how
        long the oldest of the latter has waited in seconds).

        Also sets the ``aftertune_examples_waiting`` gauge to the first.
        """
        settings = self._settings()
        with (
            ExampleStore.in_state_dir(settings.state_dir, settings.store.url) as store,
            Registry(settings.state_dir, settings.store.url) as registry,
        ):
            champion = registry.champion()
            watermark = champion.data_seq if champion is not None else 0
            newer = store.count_train_after(watermark)
            since = max(watermark, self._attempted_seq)
            fresh = store.count_train_after(since)
            first = store.first_added_after(since)
        self._metrics.waiting.set(newer)
        return newer, fresh, 0.0 if first is None else max(0.0, time.time() - first)

    def request_repair(self) -> None:
        """Have publication repaired (the champion's bundle exported again) at the next chance:
        now, or when the running cycle is over (the threshold job asks again)."""
        self._repair.set()
        self._begin(REPAIR)

    def _check_threshold(self) -> None:
        if self._repair.is_set():
            self._begin(REPAIR)
        _, fresh, waited = self.waiting()
        cycle = self._settings().cycle
        if fresh >= cycle.min_new_examples:
            self._begin(f"{fresh} new examples")
        elif fresh and waited >= cycle.max_wait_s:
            self._begin(f"{fresh} new examples, the oldest waiting {waited:.0f}s")

    def _check_interval(self) -> None:
        if self.waiting()[0] > 0:
            self._begin("interval")

    def _check_shadow(self) -> None:
        if candidate_version(self._settings()) is not None:
            self._begin(SHADOW)
        else:  # approved or rejected by a person meanwhile, or never any
            self._metrics.record_shadow(None)

    def _begin(self, reason: str) -> None:
        with self._guard:
            if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            if not self._lock.acquire():
                log.debug("another daemon holds the trainer lock; not starting a cycle")
                return
            self.progress = CycleProgress(running=True, reason=reason, started=time.time())
            self._thread = threading.Thread(
                target=self._run, args=(reason,), name="cycle", daemon=True
            )
            self._thread.start()

    # --- the cycle thread

    def _should_stop(self, step: int, total: int) -> bool:
        self.progress.step, self.progress.total_steps = step, total
        if total:
            self._metrics.cycle_progress.set(step / total)
        return self._stop.is_set() or self._lock.lost.is_set()

    def _run(self, reason: str) -> None:
        from aftertune.daemon.learning import (
            interrupted_versions,
            recover_publication,
            run_cycle_once,
        )

        settings = self._settings()
        t0 = time.monotonic()
        outcome, result = "failed", None
        try:
            self._repair.clear()
            recover_publication(settings)
            self._announce_latest(settings)
            if reason == SHADOW:
                outcome = "skipped"  # not a cycle: cycles_total counts none
                judgment = judge_shadow(settings, self._client)
                self._metrics.record_shadow(judgment)
                if judgment is not None and judgment.status == "passed":
                    self._attempted_seq = 0
                    self._announce_latest(settings)
                return
            if reason in ("start-up", REPAIR):
                interrupted = bool(interrupted_versions(settings)) or _has_checkpoints(settings)
                if not interrupted and self.waiting()[1] < settings.cycle.min_new_examples:
                    outcome = "skipped"
                    return
            log.info("cycle starting (%s)", reason)
            self._attempted_seq = max(self._attempted_seq, self._max_seq(settings))
            self.progress.total_steps = None  # the recipe reports it with the first step
            result = run_cycle_once(settings, actor="daemon", should_stop=self._should_stop)
            outcome = result.decision.value
            self._announce_latest(settings)
            if outcome == "promoted":
                self._attempted_seq = 0
        except TrainingInterrupted as exc:
            outcome = "interrupted"
            log.info("cycle interrupted: %s", exc)
        except (NothingToTrain, CycleBlocked) as exc:
            outcome = "skipped"
            log.info("no cycle: %s", exc)
        except LearnerError as exc:
            log.error("cycle failed: %s", exc)
        except Exception:
            log.exception("cycle failed unexpectedly; the daemon keeps ingesting")
        finally:
            self._lock.release()
            self.progress.running = False
            self.progress.last_outcome = outcome
            if outcome != "skipped":
                self._metrics.record_cycle(outcome, time.monotonic() - t0, result)

    def _max_seq(self, settings: Settings) -> int:
        with ExampleStore.in_state_dir(settings.state_dir, settings.store.url) as store:
            return store.max_seq()

    def _announce_latest(self, settings: Settings) -> None:
        """The promotion event of ``latest``, unless the stream's newest event names it."""
        try:
            announce_latest(self._client, settings)
        except redis.RedisError as exc:
            log.warning("promotion event not sent (%s); retried before the next cycle", exc)


def _has_checkpoints(settings: Settings) -> bool:
    return any(
        any(run.glob("checkpoints/*")) for run in StateLayout(settings.state_dir).training_runs()
    )
