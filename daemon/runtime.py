"""Assemble the daemon from settings: Redis (embedded or not), store, ingestor, worker."""

from __future__ import annotations

import logging

from aftertune.daemon.embedded_redis import redis_connection
from aftertune.daemon.ingest import IngestConfig, Ingestor
from aftertune.daemon.settings import Settings
from aftertune.daemon.worker import Worker
from aftertune.store.examples import ExampleStore

log = logging.getLogger(__name__)


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
    )


def serve(settings: Settings, *, burst: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT (or, with burst, until drained). Returns exit code."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with (
        redis_connection(settings.redis.url, settings.state_dir) as client,
        ExampleStore.in_state_dir(settings.state_dir) as store,
    ):
        worker = Worker(Ingestor(client, store, ingest_config(settings)))
        worker.install_signal_handlers()
        totals = worker.work(burst=burst)
        if burst:
            print(
                f"ingested {totals.read} entries: {totals.stored} stored, "
                f"{totals.duplicates} duplicates, {totals.dead} dead-lettered"
            )
    return 0
