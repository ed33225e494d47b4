"""The trainer lock on a real Redis: one holder, a TTL that is renewed, a restart takes back
its own lock, and a lock lost to another daemon is reported."""

from __future__ import annotations

import time

import redis

from aftertune.daemon.trainer_lock import LOCK_KEY, TrainerLock


def test_one_holder_at_a_time_and_release_frees_it(redis_client: redis.Redis) -> None:
    a = TrainerLock(redis_client, ttl_s=5, owner="daemon-a")
    b = TrainerLock(redis_client, ttl_s=5, owner="daemon-b")
    assert a.acquire()
    assert not b.acquire()
    assert redis_client.get(LOCK_KEY) == b"daemon-a"
    a.release()
    assert redis_client.exists(LOCK_KEY) == 0
    assert b.acquire()
    b.release()


def test_the_ttl_is_renewed_while_held(redis_client: redis.Redis) -> None:
    lock = TrainerLock(redis_client, ttl_s=1.5, owner="daemon-a")
    assert lock.acquire()
    time.sleep(2.5)  # longer than the TTL: only renewal keeps the key
    assert redis_client.get(LOCK_KEY) == b"daemon-a"
    assert not lock.lost.is_set()
    lock.release()


def test_a_restarted_daemon_takes_back_its_own_lock(redis_client: redis.Redis) -> None:
    # What a kill -9 leaves: the key, with its TTL still running, and no renewer.
    redis_client.set(LOCK_KEY, "daemon-a", px=60_000)
    assert not TrainerLock(redis_client, ttl_s=5, owner="daemon-b").acquire()
    again = TrainerLock(redis_client, ttl_s=5, owner="daemon-a")
    assert again.acquire()
    assert 0 < redis_client.pttl(LOCK_KEY) <= 5_000  # re-armed with its own TTL
    again.release()
    assert redis_client.exists(LOCK_KEY) == 0


def test_a_lock_taken_over_is_reported_lost(redis_client: redis.Redis) -> None:
    lock = TrainerLock(redis_client, ttl_s=1.5, owner="daemon-a")
    assert lock.acquire()
    redis_client.set(LOCK_KEY, "daemon-b")  # expired and taken by another daemon
    assert lock.lost.wait(3)
    lock.release()  # not ours any more: logged, not raised
    assert redis_client.get(LOCK_KEY) == b"daemon-b"
