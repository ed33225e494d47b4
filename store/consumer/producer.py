"""Producer API: push feedback records onto the stream. Imports no torch; any language can
do the same with ``XADD <stream> * record <json>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis

DEFAULT_STREAM = "aftertune:feedback"
PIPELINE_CHUNK = 1000


def encode_record(record: Mapping[str, Any] | str | bytes) -> bytes:
    """A mapping becomes compact UTF-8 JSON; str and bytes are sent as they are."""
    if isinstance(record, bytes):
        return record
    if isinstance(record, str):
        return record.encode("utf-8", "surrogatepass")
    return json.dumps(dict(record), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Producer:
    """Pushes records to the feedback stream, pipelined.

    >>> Producer("redis://localhost:6379/0").push([{"task": "t", "instruction": "i", "output": "o"}])
    1
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        stream: str = DEFAULT_STREAM,
        client: redis.Redis | None = None,
    ) -> None:
        if client is None and url is None:
            raise ValueError("Producer needs a Redis url or a client")
        self._owns_client = client is None
        self.client = client if client is not None else redis.Redis.from_url(str(url))
        self.stream = stream

    def push(self, records: Iterable[Mapping[str, Any] | str | bytes]) -> int:
        """XADD each record as the ``record`` field; returns how many were sent."""
        sent = 0
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(self.stream, {"record": encode_record(record)})
            sent += 1
            if sent % PIPELINE_CHUNK == 0:
                pipe.execute()
        pipe.execute()
        return sent

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
