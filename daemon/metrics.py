"""Prometheus metrics of one daemon, served on ``/metrics`` by the HTTP server.

Counters move where things happen (ingest loop, cycle thread); gauges that describe the
state (examples, pending, champion) are refreshed by the loop's heartbeat, so a scrape never
touches Redis or SQLite from the server's thread.
"""

from __future__ import annotations

import math
import platform
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from aftertune.daemon.ingest import IngestStats
from aftertune.daemon.shadow_judge import ShadowJudgment

SHADOW_STATES = ["none", "waiting", "passed", "failed", "timed_out"]


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds...
        ProcessCollector(registry=r)
        self.build = Info("aftertune_build", "Version of aftertune and of Python", registry=r)
        self.build.info({"version": _aftertune_version(), "python": platform.python_version()})
        self.ingested = Counter(
            "aftertune_records_ingested", "Stream entries stored as new examples", registry=r
        )
        self.duplicates = Counter(
            "aftertune_records_duplicate", "Stream entries already in the store", registry=r
        )
        self.dead_lettered = Counter(
            "aftertune_records_dead_lettered", "Stream entries rejected to the DLQ", registry=r
        )
        self.pending = Gauge(
            "aftertune_stream_pending", "Entries read by the group but not yet acked", registry=r
        )
        self.examples = Gauge("aftertune_examples", "Examples in the store", ["split"], registry=r)
        # Set by the scheduler's checks (every cycle.check_every_s), which count it anyway.
        self.waiting = Gauge(
            "aftertune_examples_waiting", "Train examples newer than the champion", registry=r
        )
        self.cycles = Counter(
            "aftertune_cycles", "Learning cycles by outcome", ["outcome"], registry=r
        )
        self.cycle_seconds = Histogram(
            "aftertune_cycle_duration_seconds",
            "Wall time of a learning cycle",
            buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=r,
        )
        self.cycle_progress = Gauge(
            "aftertune_cycle_progress_ratio", "Training progress of the running cycle", registry=r
        )
        self.train_tokens_per_s = Gauge(
            "aftertune_train_tokens_per_second", "Training throughput of the last cycle", registry=r
        )
        self.export_seconds = Gauge(
            "aftertune_export_duration_seconds",
            "Export + parity + publish of the last promotion",
            registry=r,
        )
        self.champion_version = Gauge(
            "aftertune_champion_version", "Registry version of the champion (0 = base)", registry=r
        )
        self.gate_metric = Gauge(
            "aftertune_gate_metric",
            "Held-out scores of the last judged challenger",
            ["task", "metric", "model"],
            registry=r,
        )
        self.bundles_damaged = Counter(
            "aftertune_bundles_damaged",
            "Published bundles that failed verification and were taken out of service",
            registry=r,
        )
        self.ready = Gauge("aftertune_ready", "1 once Redis, store and server are up", registry=r)
        self._add_shadow_metrics(r)

    def _add_shadow_metrics(self, r: CollectorRegistry) -> None:
        """Shadow evaluation (gate.shadow_requests): the figures of the last version judged on
        live traffic, refreshed each time the daemon tallies the answer servers' reports."""
        self.shadow_version = Gauge(
            "aftertune_shadow_version",
            "Version in shadow evaluation on live traffic (0 = none)",
            registry=r,
        )
        self.shadow_status = Enum(
            "aftertune_shadow_status",
            "Verdict on the last version judged on live traffic",
            states=SHADOW_STATES,
            registry=r,
        )
        self.shadow_compared = Gauge(
            "aftertune_shadow_compared",
            "Live records the last shadowed version answered beside the champion",
            registry=r,
        )
        self.shadow_feedback = Gauge(
            "aftertune_shadow_feedback",
            "Feedback received on answers the last shadowed version also gave",
            registry=r,
        )
        self.shadow_agreement = Gauge(
            "aftertune_shadow_agreement_ratio",
            "Share of the last shadowed version's answers that agree (NaN before the first)",
            ["against"],
            registry=r,
        )
        self.shadow_servers = Gauge(
            "aftertune_shadow_servers",
            "Answer servers that reported on the last shadowed version",
            registry=r,
        )

    def count_ingest(self, stats: IngestStats) -> None:
        self.ingested.inc(stats.stored)
        self.duplicates.inc(stats.duplicates)
        self.dead_lettered.inc(stats.dead)

    def record_cycle(self, outcome: str, seconds: float, result: Any | None = None) -> None:
        """``result``: a CycleResult (its training report and per-task metrics), if any."""
        self.cycles.labels(outcome).inc()
        self.cycle_seconds.observe(seconds)
        self.cycle_progress.set(0)
        if result is None:
            return
        if result.trained:
            self.train_tokens_per_s.set(float(result.trained.get("tokens_per_s", 0.0)))
        if "publish_s" in result.timings:
            self.export_seconds.set(result.timings["publish_s"])
        for task, entry in result.metrics.items():
            for model in ("champion", "challenger"):
                for metric, value in entry.get(model, {}).items():
                    if metric != "n":
                        self.gate_metric.labels(task, metric, model).set(float(value))

    def record_shadow(self, judgment: ShadowJudgment | None) -> None:
        """The daemon's latest look at shadow evaluation; None: no version is in it now (the
        last one's figures stay)."""
        if judgment is None:
            self.shadow_version.set(0)
            return
        waiting = judgment.status in ("waiting", "timed_out")
        self.shadow_version.set(judgment.version if waiting else 0)
        self.shadow_status.state(judgment.status)
        t = judgment.tally
        self.shadow_compared.set(t.compared)
        self.shadow_feedback.set(t.feedback)
        self.shadow_servers.set(t.servers)
        for against, share in (("champion", t.champion_share), ("feedback", t.feedback_share)):
            self.shadow_agreement.labels(against).set(math.nan if share is None else share)


def _aftertune_version() -> str:
    try:
        return package_version("aftertune")
    except PackageNotFoundError:
        return "unknown"
