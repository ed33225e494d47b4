"""Ingest: feedback stream → validated records → example store, at least once.

Order per batch: read (XREADGROUP) → validate → store commit → XACK. Invalid entries are
dead-lettered and acknowledged in one MULTI/EXEC, so each lands on the dead-letter stream
exactly once. A crash between the store commit and XACK redelivers the batch, which the
idempotent store absorbs. Entries a dead consumer left pending are taken over with
XAUTOCLAIM at start and every ``claim_interval_s``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from aftertune.store.errors import RecordError
from aftertune.store.examples import ExampleStore
from aftertune.store.records import Record, parse_record

log = logging.getLogger(__name__)

RECORD_FIELD = b"record"
Entry = tuple[bytes, dict[bytes, bytes]]
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)


@dataclass(frozen=True)
class IngestConfig:
    """What the ingestor needs; the daemon builds it from Settings (``service.ingest_config``).

    The defaults serve benches and tests that build an Ingestor without Settings; they equal
    ``IngestSettings``' defaults (tests/test_ingest.py checks).
    """

    stream: str
    dead_letter_stream: str
    group: str
    consumer: str
    batch_size: int = 1000
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    claim_interval_s: float = 30.0
    max_record_bytes: int = 64 * 1024
    dead_letter_max_payload_bytes: int = 1024 * 1024


@dataclass
class IngestStats:
    read: int = 0
    stored: int = 0  # newly inserted (duplicates are read and acked, not stored twice)
    duplicates: int = 0
    dead: int = 0
    claimed: int = 0

    def add(self, other: IngestStats) -> None:
        self.read += other.read
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.dead += other.dead
        self.claimed += other.claimed


@dataclass
class _Triage:
    records: list[Record] = field(default_factory=list)
    ok_ids: list[bytes] = field(default_factory=list)
    dead: list[tuple[bytes, dict[bytes, bytes], str]] = field(default_factory=list)


class Ingestor:
    """Moves entries from the feedback stream into the store. One instance per consumer."""

    def __init__(self, client: redis.Redis, store: ExampleStore, config: IngestConfig) -> None:
        self.client = client
        self.store = store
        self.config = config
        self.totals = IngestStats()
        self._own_pending_done = False
        self._next_claim = 0.0

    def ensure_group(self) -> None:
        """Create the consumer group (and stream) if missing; from id 0 so nothing is skipped."""
        try:
            self.client.xgroup_create(self.config.stream, self.config.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.config.group, self.config.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def reread_own_pending(self) -> None:
        """Start again from our own pending entries (after a restart or a Redis outage)."""
        self._own_pending_done = False

    def poll(self, block_ms: int | None = None) -> IngestStats:
        """One step: our own pending entries first (after a restart), then claims, then new."""
        stats = IngestStats()
        if not self._own_pending_done:
            entries = self._read("0", block_ms=None)
            if entries:
                stats.add(self._process(entries))
                return stats
            self._own_pending_done = True
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.config.claim_interval_s
            claimed = self.claim_stale()
            if claimed:
                stats.claimed += len(claimed)
                stats.add(self._process(claimed))
                return stats
        block = self.config.block_ms if block_ms is None else block_ms
        entries = self._read(">", block_ms=block)
        if entries:
            stats.add(self._process(entries))
        return stats

    def claim_stale(self) -> list[Entry]:
        """Take over entries pending longer than claim_idle_ms on other (dead) consumers."""
        claimed: list[Entry] = []
        start = "0-0"
        while True:
            reply: Any = self.client.xautoclaim(
                self.config.stream,
                self.config.group,
                self.config.consumer,
                min_idle_time=self.config.claim_idle_ms,
                start_id=start,
                count=self.config.batch_size,
            )
            start, entries = reply[0], reply[1]
            # Entries deleted from the stream while pending come back as None: ack them away.
            claimed.extend(e for e in entries if e is not None and e[1] is not None)
            if start in (b"0-0", "0-0") or len(claimed) >= self.config.batch_size:
                break
        if claimed:
            log.info("claimed %d entries left pending by other consumers", len(claimed))
        return claimed

    def drain(self, should_stop: Callable[[], bool] = lambda: False) -> IngestStats:
        """Ingest until the stream and the pending lists are drained (``serve --burst``)."""
        total = IngestStats()
        self._next_claim = 0.0
        while not should_stop():
            stats = self.poll(block_ms=0)
            total.add(stats)
            if stats.read == 0 and self._own_pending_done:
                if self.claim_stale():
                    self._next_claim = 0.0
                    continue
                break
        return total

    def _read(self, start: str, block_ms: int | None) -> list[Entry]:
        reply: Any = self.client.xreadgroup(
            self.config.group,
            self.config.consumer,
            {self.config.stream: start},
            count=self.config.batch_size,
            block=block_ms if block_ms else None,
        )
        if not reply:
            return []
        entries = reply[0][1]
        # With start "0" a deleted-but-pending entry has fields None: dead-letter it away.
        return [(eid, fields if fields is not None else {}) for eid, fields in entries]

    def _triage(self, entries: Sequence[Entry]) -> _Triage:
        out = _Triage()
        for entry_id, fields in entries:
            payload = fields.get(RECORD_FIELD)
            if payload is None:
                names = sorted(k.decode("utf-8", "replace") for k in fields)
                reason = f"entry has no 'record' field (fields: {names or 'none'})"
                out.dead.append((entry_id, fields, reason))
                continue
            try:
                record = parse_record(payload, max_bytes=self.config.max_record_bytes)
            except RecordError as exc:
                out.dead.append((entry_id, fields, exc.reason))
                continue
            out.records.append(record)
            out.ok_ids.append(entry_id)
        return out

    def _process(self, entries: Sequence[Entry]) -> IngestStats:
        triage = self._triage(entries)
        stored = self.store.add(triage.records)  # committed before anything is acked
        pipe = self.client.pipeline(transaction=True)
        for entry_id, fields, reason in triage.dead:
            pipe.xadd(self.config.dead_letter_stream, self._dead_letter(entry_id, fields, reason))
        all_ids = triage.ok_ids + [d[0] for d in triage.dead]
        if all_ids:
            pipe.xack(self.config.stream, self.config.group, *all_ids)
        pipe.execute()
        if triage.dead:
            # One line per batch, not per entry: a flood of bad input must not flood the log.
            first_id, _, first_reason = triage.dead[0]
            log.warning(
                "dead-lettered %d entries (first: %s: %s)",
                len(triage.dead),
                first_id.decode(),
                first_reason,
            )
        stats = IngestStats(
            read=len(entries),
            stored=stored,
            duplicates=len(triage.records) - stored,
            dead=len(triage.dead),
        )
        self.totals.add(stats)
        return stats

    def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], reason: str
    ) -> dict[Any, Any]:
        payload = fields.get(RECORD_FIELD)
        if payload is None:
            # No record field: keep every field so a requeue can restore the entry as it was.
            payload = json.dumps(
                {
                    k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                    for k, v in fields.items()
                }
            ).encode()
            kind = "fields"
        else:
            kind = "record"
        limit = self.config.dead_letter_max_payload_bytes
        return {
            "entry_id": entry_id,
            "stream": self.config.stream,
            "reason": reason,
            "payload_kind": kind,
            "payload": payload[:limit],
            "payload_bytes": len(payload),
            "truncated": int(len(payload) > limit),
            "consumer": self.config.consumer,
            "failed_at": f"{time.time():.3f}",
        }
