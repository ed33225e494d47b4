"""Promotion events: ``XADD aftertune:promotions * version N manifest_sha256 H publisher P
server URL``.

Consumers that would rather be told than poll read this stream (``XREAD BLOCK``) and pull
the version it names. An event is sent after ``latest`` moved; one lost to a crash or an
unreachable Redis is sent at the next daemon start (``announce_if_missed``). ``publisher``
(the daemon's consumer name) and ``server`` (where its HTTP server answers) let the other
daemons pull the bundle from it (bundle_follow.py).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from aftertune.daemon.settings import Settings
from aftertune.store.bundles import Published, latest_version, published
from aftertune.store.layout import StateLayout

log = logging.getLogger(__name__)

MAXLEN = 10_000  # approximate cap: the stream is a notification channel, not the registry


@dataclass(frozen=True)
class Promotion:
    """One event of the promotions stream."""

    entry_id: str
    version: int
    manifest_sha256: str
    publisher: str = ""
    server: str = ""


def announce(
    client: redis.Redis, stream: str, bundle: Published, publisher: str = "", server: str = ""
) -> str:
    """Send the promotion event for ``bundle``; returns the entry id."""
    entry = client.xadd(
        stream,
        {
            "version": str(bundle.version),
            "manifest_sha256": bundle.manifest_sha256,
            "published_at": f"{time.time():.3f}",
            "publisher": publisher,
            "server": server,
        },
        maxlen=MAXLEN,
        approximate=True,
    )
    log.info("announced v%d on %s (%s)", bundle.version, stream, _text(entry))
    return _text(entry)


def promotion(entry_id: bytes | str, fields: dict[Any, Any] | None) -> Promotion | None:
    """The event in one stream entry; None for an entry that is not one (no version)."""
    found = {_text(k): _text(v) for k, v in (fields or {}).items()}
    try:
        version = int(found["version"])
    except (KeyError, ValueError):
        return None
    return Promotion(
        _text(entry_id),
        version,
        found.get("manifest_sha256", ""),
        found.get("publisher", ""),
        found.get("server", ""),
    )


def newest_promotion(client: redis.Redis, stream: str) -> Promotion | None:
    entries: Any = client.xrevrange(stream, count=1)
    return promotion(entries[0][0], entries[0][1]) if entries else None


def last_announced(client: redis.Redis, stream: str) -> tuple[int, str] | None:
    """(version, manifest_sha256) of the newest event on ``stream``, if any."""
    event = newest_promotion(client, stream)
    return (event.version, event.manifest_sha256) if event else None


def announce_if_missed(
    client: redis.Redis, stream: str, bundles_dir: Path, publisher: str = "", server: str = ""
) -> str | None:
    """Announce ``latest`` when the stream's newest event names another bundle."""
    version = latest_version(bundles_dir)
    if version is None:
        return None
    bundle = published(bundles_dir, version)
    if last_announced(client, stream) == (bundle.version, bundle.manifest_sha256):
        return None
    return announce(client, stream, bundle, publisher, server)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def advertised_url(host: str, port: int, configured: str | None) -> str:
    """Where this daemon's HTTP server answers other daemons (``server.advertise_url``)."""
    if configured:
        return configured.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def announce_latest(client: redis.Redis, settings: Settings) -> str | None:
    """``announce_if_missed`` for the daemon ``settings`` describe, naming it and its server."""
    server = settings.server
    return announce_if_missed(
        client,
        settings.redis.promotions_stream,
        StateLayout(settings.state_dir).bundles,
        publisher=settings.redis.consumer,
        server=advertised_url(server.host, server.port, server.advertise_url)
        if server.enabled
        else "",
    )
