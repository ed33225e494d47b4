"""Promotion events: ``XADD aftertune:promotions * version N manifest_sha256 H``.

Consumers that would rather be told than poll read this stream (``XREAD BLOCK``) and pull
the version it names. An event is sent after ``latest`` moved; one lost to a crash or an
unreachable Redis is sent at the next daemon start (``announce_if_missed``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

from aftertune.store.bundles import Published, latest_version, published

log = logging.getLogger(__name__)

MAXLEN = 10_000  # approximate cap: the stream is a notification channel, not the registry


def announce(client: redis.Redis, stream: str, bundle: Published) -> str:
    """Send the promotion event for ``bundle``; returns the entry id."""
    entry = client.xadd(
        stream,
        {
            "version": str(bundle.version),
            "manifest_sha256": bundle.manifest_sha256,
            "published_at": f"{time.time():.3f}",
        },
        maxlen=MAXLEN,
        approximate=True,
    )
    log.info("announced v%d on %s (%s)", bundle.version, stream, _text(entry))
    return _text(entry)


def last_announced(client: redis.Redis, stream: str) -> tuple[int, str] | None:
    """(version, manifest_sha256) of the newest event on ``stream``, if any."""
    entries = client.xrevrange(stream, count=1)
    if not entries:
        return None
    fields = {_text(k): _text(v) for k, v in (entries[0][1] or {}).items()}
    try:
        return int(fields["version"]), fields.get("manifest_sha256", "")
    except (KeyError, ValueError):
        return None


def announce_if_missed(client: redis.Redis, stream: str, bundles_dir: Path) -> str | None:
    """Announce ``latest`` when the stream's newest event names another bundle."""
    version = latest_version(bundles_dir)
    if version is None:
        return None
    bundle = published(bundles_dir, version)
    if last_announced(client, stream) == (bundle.version, bundle.manifest_sha256):
        return None
    return announce(client, stream, bundle)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
