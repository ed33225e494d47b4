"""The dead-letter stream: list rejected entries with their reasons, requeue them once fixed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from aftertune.store.records import printable


@dataclass(frozen=True)
class DeadLetter:
    id: str  # id on the dead-letter stream
    entry_id: str  # id the entry had on the feedback stream
    reason: str
    payload_kind: str  # "record" (the record field) or "fields" (all fields, JSON)
    payload_bytes: int
    truncated: bool
    failed_at: float
    preview: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        """Two lines for a terminal: ids and reason, then the payload's start. Anyone who
        can XADD wrote these: control characters are escaped, not sent to the terminal."""
        head = printable(f"{self.id}  entry {self.entry_id}  {self.reason}")
        return f"{head}\n    {self.preview!r}"  # repr escapes as printable() does


def _text(fields: dict[bytes, bytes], key: str, default: str = "") -> str:
    return fields.get(key.encode(), default.encode()).decode("utf-8", "replace")


def list_dead_letters(
    client: redis.Redis, stream: str, count: int | None = None
) -> list[DeadLetter]:
    out = []
    reply: Any = client.xrange(stream, count=count)
    for dead_id, fields in reply:
        payload = fields.get(b"payload", b"")
        out.append(
            DeadLetter(
                id=dead_id.decode(),
                entry_id=_text(fields, "entry_id"),
                reason=_text(fields, "reason"),
                payload_kind=_text(fields, "payload_kind", "record"),
                payload_bytes=int(_text(fields, "payload_bytes", "0") or 0),
                truncated=_text(fields, "truncated", "0") == "1",
                failed_at=float(_text(fields, "failed_at", "0") or 0),
                preview=payload[:120].decode("utf-8", "replace"),
            )
        )
    return out


def requeue(
    client: redis.Redis, dead_stream: str, target_stream: str, ids: Sequence[str] | None
) -> tuple[int, list[str]]:
    """Put dead letters back on the feedback stream as they arrived; ``ids=None`` = all.

    Returns (requeued, problems). A truncated payload cannot be restored and stays put.
    """
    entries: list[Any] = []
    problems: list[str] = []
    if ids is None:
        entries = list(client.xrange(dead_stream))  # type: ignore[arg-type]
    else:
        for dead_id in ids:
            found: Any = client.xrange(dead_stream, min=dead_id, max=dead_id)
            if not found:
                problems.append(f"{dead_id}: no such dead letter")
            entries.extend(found)
    done = 0
    for dead_id, fields in entries:
        if fields.get(b"truncated") == b"1":
            problems.append(f"{dead_id.decode()}: payload was truncated; cannot requeue")
            continue
        payload = fields.get(b"payload", b"")
        if fields.get(b"payload_kind") == b"fields":
            original = {k: v.encode() for k, v in json.loads(payload).items()} or {b"": b""}
        else:
            original = {b"record": payload}
        pipe = client.pipeline(transaction=True)
        pipe.xadd(target_stream, original)
        pipe.xdel(dead_stream, dead_id)
        pipe.execute()
        done += 1
    return done, problems
