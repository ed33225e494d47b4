"""Ingest: feedback stream → validated records → example store, at least once.

Order per batch: read (XREADGROUP) → validate → store commit → XACK. Invalid entries are
dead-lettered and acknowledged in one MULTI/EXEC, so each lands on the dead-letter stream
exactly once. A crash between the store commit and XACK redelivers the batch, which the
idempotent store absorbs. Entries a dead consumer left pending are taken over with
XAUTOCLAIM at start and every ``claim_interval_s``.

Dead-lettered, with the reason: an entry without a ``record`` field or with more than one,
a record that fails validation, a new task name that imitates a known one (all its letters
Cyrillic, Greek or fullwidth look-alikes: ``store/lookalikes.py``), a record id already
stored with other content. A batch is bounded by entries (``batch_size``) and by bytes
(``max_batch_bytes``): the next read asks for as many entries as fit, judged by the largest
entry of the last one. A storage error (disk full, I/O) raises StorageError before anything
is acknowledged; the worker waits it out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from aftertune.store.errors import RecordError
from aftertune.store.examples import ExampleStore
from aftertune.store.failpoints import failpoint
from aftertune.store.lookalikes import TaskNames, imitation_reason
from aftertune.store.records import Record, parse_record

log = logging.getLogger(__name__)

RECORD_FIELD = b"record"
REUSED_ID = "id reused with different content"
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)
# How often a batch with a task name not seen yet reads the store's names again: the tasks
# other daemons added since, at a bounded cost under a flood of new names.
TASKS_REREAD_S = 5.0


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
    max_batch_bytes: int = 64 * 1024 * 1024


class Entry(NamedTuple):
    """One stream entry as Redis sent it; ``repeated`` names fields it carries twice or more.

    ``size``: bytes of its field names and values (what holding it costs, near enough).
    """

    id: bytes
    fields: dict[bytes, bytes]
    size: int
    repeated: tuple[bytes, ...] = ()


def _entry(entry_id: bytes, flat: list[bytes] | None) -> Entry:
    """An entry from Redis' flat [name, value, name, value, ...] list, repeats kept in view."""
    if flat and len(flat) == 2:  # the wire format's one field: the common case, made short
        return Entry(entry_id, {flat[0]: flat[1]}, len(flat[0]) + len(flat[1]))
    fields: dict[bytes, bytes] = {}
    repeated: list[bytes] = []
    size = 0
    for name, value in zip(flat[::2], flat[1::2], strict=True) if flat else ():
        if name in fields and name not in repeated:
            repeated.append(name)
        fields[name] = value
        size += len(name) + len(value)
    return Entry(entry_id, fields, size, tuple(repeated))


def _near_record_fields(fields: dict[bytes, bytes]) -> str:
    """Fields other than ``record`` that a reader might take for it ('RECORD', ' record');
    '' when there are none."""
    near = [
        k.decode("utf-8", "replace")
        for k in fields
        if k != RECORD_FIELD and k.strip().lower() == RECORD_FIELD
    ]
    return ", ".join(repr(name) for name in sorted(near))


def _parse_xreadgroup(response: Any, **options: Any) -> list[Entry]:
    """XREADGROUP's reply (RESP2 list or RESP3 map, one stream) as entries.

    redis-py's own parser makes a dict of each entry's fields, which keeps only the last
    of two fields with the same name: an entry with two ``record`` fields must be seen.
    With start "0" a deleted-but-pending entry has no fields: it is dead-lettered away.
    """
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else [r[1] for r in response]
    return [_entry(item[0], item[1]) for entries in streams for item in entries if item]


def _parse_xautoclaim(response: Any, **options: Any) -> tuple[bytes, list[Entry]]:
    """XAUTOCLAIM's reply as (next start id, entries still in the stream)."""
    return response[0], [_entry(i[0], i[1]) for i in response[1] if i and i[1] is not None]


@dataclass
class ReadSize:
    """How many entries the next read asks for, so that a batch holds about ``max_bytes``.

    It starts at one entry and doubles while reads come back full, up to ``batch_size`` and
    to what fits in ``max_bytes`` at the size of the largest entry last read; an idle read
    starts it over, so a burst of huge entries after a quiet spell is read a few at a time.
    """

    batch_size: int
    max_bytes: int
    count: int = 1

    def after(self, entries: Sequence[Entry]) -> None:
        if not entries:
            self.count = 1
            return
        largest = max(e.size for e in entries)
        grown = self.count * 2 if len(entries) >= self.count else self.count
        fits = max(1, self.max_bytes // max(largest, 1))
        self.count = max(1, min(self.batch_size, grown, fits))


@dataclass
class IngestStats:
    read: int = 0
    read_bytes: int = 0  # bytes of the entries read (field names and values)
    stored: int = 0  # newly inserted (duplicates are read and acked, not stored twice)
    duplicates: int = 0
    dead: int = 0
    claimed: int = 0

    def add(self, other: IngestStats) -> None:
        self.read += other.read
        self.read_bytes += other.read_bytes
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
        # Reads go through a client of the same pool with our own reply parsers (see
        # _parse_xreadgroup); the caller's client keeps redis-py's.
        self._reader = redis.Redis(connection_pool=client.connection_pool)
        self._reader.set_response_callback("XREADGROUP", _parse_xreadgroup)
        self._reader.set_response_callback("XAUTOCLAIM", _parse_xautoclaim)
        self.read_size = ReadSize(config.batch_size, config.max_batch_bytes)
        self.totals = IngestStats()
        self._own_pending_done = False
        self._next_claim = 0.0
        self.task_names = TaskNames()  # what a new task name must not imitate
        self._next_tasks_read = 0.0

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
        start: Any = "0-0"
        size = 0
        while True:
            reply: Any = self._reader.xautoclaim(
                self.config.stream,
                self.config.group,
                self.config.consumer,
                min_idle_time=self.config.claim_idle_ms,
                start_id=start,
                count=self.read_size.count,
            )
            start, entries = reply
            # Entries deleted from the stream while pending are left out (Redis drops them).
            claimed.extend(entries)
            size += sum(e.size for e in entries)
            if entries:  # an empty page only means this stretch of pending lists was clean
                self.read_size.after(entries)
            full = len(claimed) >= self.config.batch_size or size >= self.config.max_batch_bytes
            if start in (b"0-0", "0-0") or full:
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
        entries: list[Entry] = self._reader.xreadgroup(  # type: ignore[assignment]
            self.config.group,
            self.config.consumer,
            {self.config.stream: start},
            count=self.read_size.count,
            block=block_ms if block_ms else None,
        )
        self.read_size.after(entries)
        return entries

    def _triage(self, entries: Sequence[Entry]) -> _Triage:
        out = _Triage()
        for entry_id, fields, _, repeated in entries:
            payload = fields.get(RECORD_FIELD)
            if payload is None:
                names = sorted(k.decode("utf-8", "replace") for k in fields)
                reason = f"entry has no 'record' field (fields: {names or 'none'})"
                out.dead.append((entry_id, fields, reason))
                continue
            if RECORD_FIELD in repeated:
                reason = "entry has more than one 'record' field; send one record per entry"
                out.dead.append((entry_id, fields, reason))
                continue
            near = _near_record_fields(fields)
            if near:
                reason = (
                    f"entry has {near} beside 'record'; field names are matched exactly, so "
                    "one of them would be dropped unread: send one 'record' field per entry"
                )
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

    def _refuse_lookalikes(self, triage: _Triage, entries: Sequence[Entry]) -> None:
        """Dead-letter records whose new task name imitates a known one ('ѕрес' in Cyrillic
        letters beside 'spec'), naming it; the first of two look-alikes in a batch is kept."""
        if all(record.task in self.task_names for record in triage.records):
            return
        if time.monotonic() >= self._next_tasks_read:
            self._next_tasks_read = time.monotonic() + TASKS_REREAD_S
            self.task_names.add(self.store.tasks())
        refused: dict[int, str] = {}  # position -> why
        for position, record in enumerate(triage.records):
            imitated = self.task_names.imitated(record.task)
            if imitated is None:
                self.task_names.add([record.task])
            else:
                refused[position] = imitation_reason(record.task, imitated)
        fields = {e.id: e.fields for e in entries} if refused else {}
        for position, reason in refused.items():
            entry_id = triage.ok_ids[position]
            triage.dead.append((entry_id, fields[entry_id], reason))
        for position in reversed(refused):
            del triage.records[position]
            del triage.ok_ids[position]

    def _process(self, entries: Sequence[Entry]) -> IngestStats:
        triage = self._triage(entries)
        self._refuse_lookalikes(triage, entries)
        added = self.store.add(triage.records)  # committed before anything is acked
        failpoint("ingest.stored")  # crash tests: stored, not acked (redelivered, absorbed)
        for position in reversed(added.conflicts):
            del triage.records[position]
            entry_id = triage.ok_ids.pop(position)
            fields = next(e.fields for e in entries if e.id == entry_id)
            triage.dead.append((entry_id, fields, REUSED_ID))
        pipe = self.client.pipeline(transaction=True)
        for entry_id, fields, reason in triage.dead:
            pipe.xadd(self.config.dead_letter_stream, self._dead_letter(entry_id, fields, reason))
        all_ids = triage.ok_ids + [d[0] for d in triage.dead]
        if all_ids:
            pipe.xack(self.config.stream, self.config.group, *all_ids)
        pipe.execute()
        failpoint("ingest.acked")  # crash tests: acked, before the next read
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
            read_bytes=sum(e.size for e in entries),
            stored=added.stored,
            duplicates=added.duplicates,
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
