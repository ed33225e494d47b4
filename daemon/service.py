"""Assemble the daemon from settings: Redis, store, HTTP server, scheduler, ingest loop.

``serve`` brings the parts up in order, tells systemd READY=1 once Redis, the store and the
server are up (``/readyz`` and ``aftertune_ready`` then follow Redis and the disk, see
``readiness.py``), runs the worker loop in the main thread (it owns the signals), and takes the
parts down in reverse on the way out: STOPPING=1, the cycle asked to checkpoint and given
``cycle.shutdown_timeout_s``, the server stopped, the embedded Redis stopped.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import stat
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from pydantic_core import to_jsonable_python

from aftertune.daemon.announce import advertised_url, cluster_key
from aftertune.daemon.bundle_follow import BundleFollower, FollowConfig
from aftertune.daemon.bundle_watch import BundleWatch
from aftertune.daemon.embedded_redis import redis_connection, redis_url
from aftertune.daemon.errors import SettingsError, StateDirError
from aftertune.daemon.ingest import IngestConfig, Ingestor, IngestStats
from aftertune.daemon.metrics import DaemonMetrics
from aftertune.daemon.notify import Heartbeat, Notifier, WatchdogPinger
from aftertune.daemon.readiness import Readiness, RedisPinger
from aftertune.daemon.settings import Settings, load_settings
from aftertune.daemon.worker import StopMode, Worker
from aftertune.store.bundle_audit import BundleAudit
from aftertune.store.errors import StoreError
from aftertune.store.examples import ExampleStore
from aftertune.store.files import write_atomic
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry

if TYPE_CHECKING:
    from aftertune.daemon.scheduler import CycleScheduler
    from aftertune.daemon.server import HttpServer

log = logging.getLogger(__name__)

STATUS_EVERY_S = 2.0
INGEST_LOG_EVERY_S = 5.0
RELOADABLE = ("gate", "cycle", "log_level")


class IngestLog:
    """What was ingested, at INFO: at most one line per ``every_s``, none while idle."""

    def __init__(self, every_s: float = INGEST_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self.since_last = IngestStats()
        self._next = 0.0

    def add(self, stats: IngestStats, now: float) -> None:
        self.since_last.add(stats)
        s = self.since_last
        if not s.read or now < self._next:
            return
        log.info(
            "ingested %d entries (%d bytes): %d stored, %d duplicates, %d dead-lettered",
            s.read,
            s.read_bytes,
            s.stored,
            s.duplicates,
            s.dead,
            extra={
                "fields": {
                    "read": s.read,
                    "bytes": s.read_bytes,
                    "stored": s.stored,
                    "duplicates": s.duplicates,
                    "dead_lettered": s.dead,
                }
            },
        )
        self.since_last = IngestStats()
        self._next = now + self.every_s


def ingest_config(settings: Settings) -> IngestConfig:
    """Settings → the plain arguments the ingestor takes (it never sees Settings)."""
    r, i = settings.redis, settings.ingest
    return IngestConfig(
        stream=r.stream,
        dead_letter_stream=r.dead_letter_stream,
        group=r.group,
        consumer=r.consumer,
        batch_size=i.batch_size,
        block_ms=i.block_ms,
        claim_idle_ms=i.claim_idle_ms,
        claim_interval_s=i.claim_interval_s,
        max_record_bytes=i.max_record_bytes,
        dead_letter_max_payload_bytes=i.dead_letter_max_payload_bytes,
        max_batch_bytes=i.max_batch_bytes,
    )


class Daemon:
    """The parts around the worker loop: what its heartbeat and SIGHUP do."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        store: ExampleStore,
        config: Path | None,
        overrides: dict[str, Any] | None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.config = config
        self.overrides = overrides
        self.metrics = DaemonMetrics()
        # /readyz: started (store open, server up), Redis reachable, the store writable.
        self.readiness = Readiness()
        self.metrics.ready.set_function(lambda: float(self.readiness.is_ready()))
        self.notifier = Notifier.from_env()
        self.alive = Heartbeat(max_age_s=max(10.0, 3 * settings.ingest.block_ms / 1000))
        self.server: HttpServer | None = None
        self.scheduler: CycleScheduler | None = None
        self.pinger: WatchdogPinger | None = None
        # Sees a Redis that stopped answering within redis.ping_timeout_s; the worker's
        # blocking read would wait out its 30 s socket timeout first.
        self.redis_pinger = RedisPinger(
            redis_url(settings.redis.url, settings.state_dir),
            self.readiness,
            settings.redis.ping_timeout_s,
        )
        # Verdicts on the published bundles, shared by the HTTP server and the sweeps.
        self.audit = BundleAudit(
            StateLayout(settings.state_dir).bundles, on_damaged=self._bundle_damaged
        )
        self.bundle_watch = BundleWatch(self.audit)
        self.follower = BundleFollower(
            client,
            FollowConfig(
                stream=settings.redis.promotions_stream,
                bundles_dir=StateLayout(settings.state_dir).bundles,
                me=settings.redis.consumer,
                token=settings.server.token.get_secret_value() if settings.server.token else None,
                keep=settings.export.keep,
                state_dir=settings.state_dir,
                store_url=settings.store.url,
                key=cluster_key(settings),
            ),
        )
        self._next_status = 0.0
        self._status_line = ""
        self.ingest_log = IngestLog()

    def start(self) -> None:
        """Bundles other daemons published caught up, server and scheduler up, Redis pinged,
        then READY=1 and watchdog pings."""
        self.follower.start()  # before the scheduler: a champion's bundle is pulled, not rebuilt
        if self.settings.server.enabled:
            self.start_server()
            self.register_server()
        if self.settings.cycle.enabled:
            self.start_scheduler()
        self.bundle_watch.start()  # after the scheduler: a damaged bundle asks it for repair
        self.redis_pinger.start()
        self.readiness.started()
        self.notifier.ready()
        interval = self.notifier.watchdog_interval_s
        if interval is not None:
            self.pinger = WatchdogPinger(self.notifier, interval / 2, self.alive.is_recent)
            self.pinger.start()

    def stop(self, give_up: Callable[[], bool]) -> bool:
        """STOPPING=1, the cycle asked to checkpoint, the server stopped. False when the cycle
        thread is still running after ``cycle.shutdown_timeout_s`` (or once ``give_up()``)."""
        self.notifier.stopping()
        self.readiness.stopping()
        left_running = False
        if self.scheduler is not None:
            timeout = self.settings.cycle.shutdown_timeout_s
            left_running = not self.scheduler.stop(timeout, give_up=give_up)
        self.bundle_watch.stop()
        self.follower.stop()
        if self.redis_pinger.is_alive():
            self.redis_pinger.stop()
        if self.server is not None:
            self.server.stop()
        if self.pinger is not None:
            self.pinger.stop()
        StateLayout(self.settings.state_dir).daemon_status.unlink(missing_ok=True)
        return not left_running

    def start_server(self) -> None:
        from aftertune.daemon.server import HttpServer, build_app
        from aftertune.daemon.shadow_judge import candidate_version
        from aftertune.store.consumer.pull import why_unpublished

        s = self.settings.server
        state_dir = self.settings.state_dir
        app = build_app(
            StateLayout(self.settings.state_dir).bundles,
            token=s.token.get_secret_value() if s.token else None,
            ready=self.readiness.is_ready,
            metrics=self.metrics.registry,
            audit=self.audit,
            explain=lambda version: why_unpublished(state_dir, version, self.settings.store.url),
            candidate=lambda: candidate_version(self.settings),
        )
        self.server = HttpServer(app, s.host, s.port)
        self.server.start()

    def register_server(self) -> None:
        """Tell the shared registry where this daemon's server answers: the one address other
        daemons pull its bundles from, and send the cluster token to."""
        s = self.settings
        if s.store.url is None or self.server is None:
            return  # no other daemon reads this registry
        url = advertised_url(s.server.host, self.server.port, s.server.advertise_url)
        try:
            with Registry(s.state_dir, s.store.url) as registry:
                registry.register_daemon(s.redis.consumer, url)
        except StoreError as exc:
            log.warning("not registered in the shared registry (%s): no daemon pulls from us", exc)
            return
        log.info("registered as %s at %s in the shared registry", s.redis.consumer, url)

    def _bundle_damaged(self, version: int, reason: str) -> None:
        """A bundle went out of service (any thread): count it, have the champion's re-exported."""
        self.metrics.bundles_damaged.inc()
        if self.scheduler is not None:
            self.scheduler.request_repair()

    def start_scheduler(self) -> None:
        from aftertune.daemon.scheduler import CycleScheduler

        self.scheduler = CycleScheduler(lambda: self.settings, self.client, self.metrics)
        self.scheduler.start()

    # Called by the worker loop after every poll (main thread).
    def heartbeat(self, stats: IngestStats) -> None:
        self.alive.beat()
        self.metrics.count_ingest(stats)
        now = time.monotonic()
        self.ingest_log.add(stats, now)
        if now < self._next_status:
            return
        self._next_status = now + STATUS_EVERY_S
        try:
            line, snapshot = self._snapshot()
            write_atomic(
                StateLayout(self.settings.state_dir).daemon_status,
                json.dumps(snapshot, indent=1).encode(),
            )
        except (OSError, StoreError) as exc:
            # A full disk must not stop the loop: the worker reports the store's outage.
            log.debug("status not written: %s", exc)
            return
        if line != self._status_line:
            self.notifier.status(line)
            self._status_line = line

    def _snapshot(self) -> tuple[str, dict[str, Any]]:
        counts = self.store.counts()
        examples = sum(c["train"] + c["test"] for c in counts.values())
        self.metrics.examples.labels("train").set(sum(c["train"] for c in counts.values()))
        self.metrics.examples.labels("test").set(sum(c["test"] for c in counts.values()))
        with Registry(self.settings.state_dir, self.settings.store.url) as registry:
            champion = registry.champion()
        self.metrics.champion_version.set(champion.version if champion else 0)
        pending = self._pending()
        cycle: dict[str, Any] = {}
        state = "ingesting"
        if self.scheduler is not None:
            p = self.scheduler.progress
            cycle = {
                "running": p.running,
                "reason": p.reason,
                "step": p.step,
                "total_steps": p.total_steps,
                "state": p.describe(),
                "started_at": p.started,
            }
            if p.running:
                state = f"ingesting; cycle {p.describe()}"
        who = f"v{champion.version}" if champion else "base"
        line = f"{state}; {examples} examples; champion {who}"
        snapshot = {
            "pid": os.getpid(),
            "status": line,
            "updated_at": time.time(),
            "server": f"http://{self.settings.server.host}:{self.server.port}"
            if self.server
            else None,
            "pending": pending,
            "cycle": cycle,
        }
        return line, snapshot

    def _pending(self) -> int:
        """Entries read but not acknowledged (-1: Redis did not answer); sets the gauge."""
        redis_settings = self.settings.redis
        try:
            found = self.client.xpending(redis_settings.stream, redis_settings.group)
        except redis.RedisError:
            return -1
        pending = int(found["pending"])
        self.metrics.pending.set(pending)
        return pending

    # Called by the worker loop after SIGHUP (main thread).
    def reload(self) -> None:
        self.notifier.reloading()
        try:
            fresh = load_settings(self.config, self.overrides)
        except SettingsError as exc:
            log.error("reload refused, settings unchanged: %s", exc)
            self.notifier.ready()
            return
        changed, ignored = _differences(self.settings, fresh)
        self.settings = self.settings.model_copy(
            update={section: getattr(fresh, section) for section in RELOADABLE}
        )
        logging.getLogger().setLevel(self.settings.log_level)
        if self.scheduler is not None:
            self.scheduler.reschedule(self.settings.cycle)
        log.info("reloaded settings: %s", "; ".join(changed) if changed else "nothing changed")
        if ignored:
            log.warning("these settings need a restart to change: %s", ", ".join(ignored))
        self.notifier.ready()


def _differences(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(reloadable sections that changed, as "section: old -> new"; other changed names)."""
    dumps = {
        name: (_dump(getattr(old, name)), _dump(getattr(new, name)))
        for name in type(new).model_fields
    }
    differ = [name for name, (before, after) in dumps.items() if before != after]
    changed = [
        f"{n}: {json.dumps(dumps[n][0])} -> {json.dumps(dumps[n][1])}"
        for n in RELOADABLE
        if n in differ
    ]
    return changed, [name for name in differ if name not in RELOADABLE]


def _dump(value: Any) -> Any:
    return to_jsonable_python(value)  # a section (a model or a learner's dataclass), or a value


def serve(
    settings: Settings,
    *,
    burst: bool = False,
    config: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or, with burst, until drained). Returns exit code."""
    prepare_state_dir(settings.state_dir)
    with (
        redis_connection(settings.redis.url, settings.state_dir) as client,
        ExampleStore.in_state_dir(settings.state_dir, settings.store.url) as store,
    ):
        log_where_producers_push(settings, client)
        daemon = Daemon(settings, client, store, config, overrides)
        worker = Worker(
            Ingestor(client, store, ingest_config(settings)),
            heartbeat=daemon.heartbeat,
            reload=daemon.reload,
            readiness=daemon.readiness,
        )
        worker.install_signal_handlers()
        try:
            if not burst:
                daemon.start()
            totals = worker.work(burst=burst)
        finally:
            # A second SIGTERM (cold stop) may come while we wait: stop waiting then.
            abandoned = not daemon.stop(give_up=lambda: worker.stop_mode is StopMode.COLD)
        if burst:
            print(
                f"ingested {totals.read} entries: {totals.stored} stored, "
                f"{totals.duplicates} duplicates, {totals.dead} dead-lettered"
            )
    if abandoned:
        _exit_now(0)
    return 0


def log_where_producers_push(settings: Settings, client: redis.Redis) -> None:
    """One line at start: the Redis URL and stream producers must XADD to, and who can."""
    stream = settings.redis.stream
    if settings.redis.url is not None:
        log.info(
            "producers push to stream %s on %s (redis.url)",
            stream,
            _without_password(settings.redis.url),
            extra={
                "fields": {"redis_url": _without_password(settings.redis.url), "stream": stream}
            },
        )
        return
    path = Path(str(client.connection_pool.connection_kwargs.get("path", "")))
    try:
        mode = f"{stat.S_IMODE(path.stat().st_mode):o}"
        group = grp.getgrgid(path.parent.stat().st_gid).gr_name
    except (OSError, KeyError):
        mode, group = "?", "?"
    log.info(
        "producers push to stream %s on the embedded Redis at unix://%s (directory group %s, "
        "socket mode %s): only this host can; set redis.url to a shared Redis for remote "
        "producers (docs/operations.md)",
        stream,
        path,
        group,
        mode,
        extra={"fields": {"redis_url": f"unix://{path}", "stream": stream, "embedded": True}},
    )


def _without_password(url: str) -> str:
    """The URL as it may be logged: a password in it becomes ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def prepare_state_dir(state_dir: Path) -> None:
    """Make the state dir and prove it writable, or raise StateDirError in one line."""
    probe = state_dir / f".write-test-{os.getpid()}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StateDirError(state_dir, exc) from None


def _exit_now(code: int) -> NoReturn:
    """Exit without interpreter shutdown, as a kill would (the cycle resumes at next start).

    A cycle thread left inside torch would see torch's C++ thread pools destroyed under it
    during shutdown, and the process abort ("terminate called without an active exception").
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
