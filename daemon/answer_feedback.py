"""Feedback on a served answer, as a record on the daemon's feedback stream.

Every record carries what was served (``served_version``, ``served_answer``, ``answer_id``:
the lineage from the answer to the next adapter) and the prompt. A correction is an ordinary
labelled record whose ``output`` is the corrected answer. A rating labels the served answer:
``up`` confirms it (``output`` is the served answer), ``down`` says it is wrong for this
input (``output`` is the served answer, ``rating: "down"``; always a training record, never
a held-out one). The wire fields are store/records.py's; docs/wire-format.md.
"""

from __future__ import annotations

from typing import Any, Protocol

from aftertune.daemon.answer_log import Served
from aftertune.daemon.errors import RedisUnavailable

SOURCE = "answer-server"


class FeedbackSink(Protocol):
    """Where feedback records go: the Python producer (``store/consumer/producer.py``)."""

    def push(self, record: dict[str, Any]) -> None: ...


class StreamSink:
    """Feedback records to the feedback stream, one XADD each."""

    def __init__(self, url: str, stream: str) -> None:
        from aftertune.store.consumer.producer import Producer

        self.producer = Producer(url, stream=stream)

    def push(self, record: dict[str, Any]) -> None:
        import redis

        try:
            self.producer.push([record])
        except redis.RedisError as exc:
            raise RedisUnavailable(
                f"cannot reach the feedback stream {self.producer.stream} ({exc}); "
                "the feedback was not recorded: send it again once Redis answers"
            ) from None

    def close(self) -> None:
        self.producer.close()


def feedback_record(
    served: Served, *, correction: str | None = None, rating: str | None = None
) -> dict[str, Any]:
    """The wire record for a correction of ``served`` or a rating (up/down) of it."""
    if (correction is None) == (rating is None):
        raise ValueError("give a correction or a rating")
    record: dict[str, Any] = {
        "task": served.task,
        "instruction": served.instruction,
        "input": served.input,
        "output": served.answer if correction is None else correction,
        "source": SOURCE,
        "answer_id": served.answer_id,
        "served_version": served.version,
        "served_answer": served.answer,
    }
    if rating is not None:
        record["rating"] = rating
    if rating == "down":
        record["split"] = "train"  # a wrong answer is never a held-out reference
    return record
