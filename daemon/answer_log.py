"""The answers the answer server gave, kept so that feedback can name one by its id.

Bounded twice: at most ``max_answers`` (the oldest go first) and for ``ttl_s`` seconds each.
Feedback on an id that is gone (or never was) is refused with a 404 by the server. Kept in
memory: a restart forgets the ids, which the docs say.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_ANSWERS = 100_000
DEFAULT_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class Served:
    """One answer as it was served: the prompt, the answer and the version that gave it."""

    answer_id: str
    task: str | None
    instruction: str
    input: str
    answer: str
    version: int
    at: float  # time.monotonic() when it was served


class AnswerLog:
    """Answer ids → what was served; thread-safe, bounded by count and age."""

    def __init__(self, max_answers: int = DEFAULT_MAX_ANSWERS, ttl_s: float = DEFAULT_TTL_S):
        if max_answers < 1 or ttl_s <= 0:
            raise ValueError("max_answers must be at least 1 and ttl_s greater than 0")
        self.max_answers = max_answers
        self.ttl_s = ttl_s
        self._answers: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()

    def remember(
        self, task: str | None, instruction: str, input: str, answer: str, version: int
    ) -> Served:
        served = Served(
            secrets.token_urlsafe(12), task, instruction, input, answer, version, time.monotonic()
        )
        with self._lock:
            self._answers[served.answer_id] = served
            while len(self._answers) > self.max_answers:
                self._answers.popitem(last=False)
        return served

    def find(self, answer_id: str) -> Served | None:
        """The answer ``answer_id`` names, or None if unknown or older than ``ttl_s``."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            return self._answers.get(answer_id)

    def _expire(self, now: float) -> None:
        while self._answers:
            oldest = next(iter(self._answers.values()))
            if now - oldest.at < self.ttl_s:
                return
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)
