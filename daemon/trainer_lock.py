"""One trainer at a time across every daemon sharing a Redis: a lock with a renewed TTL.

The lock is a Redis key holding a random token (redis-py's ``Lock``: SET NX PX, release and
extend by compare-and-set in Lua). A renewer thread pushes the TTL forward every third of
it; if renewal fails (Redis gone past the TTL, or another daemon took the lock after ours
expired) ``lost`` is set and the cycle stops at its next step boundary.
"""

from __future__ import annotations

import logging
import threading

import redis
from redis.exceptions import LockError

log = logging.getLogger(__name__)

LOCK_KEY = "aftertune:trainer"


class TrainerLock:
    """``owner`` (the daemon's consumer name, unique in the group) is the lock's value, so a
    daemon restarted after a crash takes back the lock its previous life left instead of
    waiting out the TTL."""

    def __init__(self, client: redis.Redis, ttl_s: float, owner: str, key: str = LOCK_KEY) -> None:
        self._lock = client.lock(key, timeout=ttl_s, blocking=False, thread_local=False)
        self.owner = owner.encode()
        self.ttl_s = ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        """True when this daemon now holds the lock; False when another one trains."""
        try:
            got = bool(self._lock.acquire(blocking=False, token=self.owner))
            if not got and self._lock.redis.get(self._lock.name) == self.owner:
                log.info("taking back the trainer lock an earlier run of this daemon held")
                self._lock.local.token = self.owner
                self._lock.reacquire()
                got = True
        except (LockError, redis.RedisError) as exc:
            log.warning("cannot take the trainer lock (%s); not training now", exc)
            return False
        if got:
            self.lost.clear()
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew, name="trainer-lock", daemon=True)
            self._renewer.start()
        return got

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._lock.reacquire()
            except (LockError, redis.RedisError) as exc:
                log.error("lost the trainer lock (%s); stopping the cycle at the next step", exc)
                self.lost.set()
                return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        try:
            self._lock.release()
        except (LockError, redis.RedisError) as exc:
            log.warning("trainer lock was not ours to release any more (%s)", exc)
