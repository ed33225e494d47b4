"""The answer server's Prometheus metrics (its own registry; docs/operations.md lists them)."""

from __future__ import annotations

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

# Seconds; a ranking answer takes milliseconds, a generated one up to seconds on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AnswerMetrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aftertune_answer_requests",
            "HTTP requests to /v1/answer and /v1/feedback, by endpoint and status code",
            ["endpoint", "code"],
            registry=r,
        )
        self.answers = Counter(
            "aftertune_answer_records", "Records answered (a batch counts each)", registry=r
        )
        self.latency = Histogram(
            "aftertune_answer_latency_seconds",
            "Time to answer one /v1/answer request, batch or single",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.version = Gauge(
            "aftertune_answer_version_served", "Version of the bundle answering now", registry=r
        )
        self.swaps = Counter(
            "aftertune_answer_swaps", "Bundles swapped in after the current link moved", registry=r
        )
        self.refused = Counter(
            "aftertune_answer_swaps_refused",
            "Bundles refused at a swap (did not verify or open); the old one kept answering",
            registry=r,
        )
        self.feedback = Counter(
            "aftertune_answer_feedback",
            "Feedback records pushed to the feedback stream, by kind",
            ["kind"],
            registry=r,
        )
