"""Promotion events: ``XADD aftertune:promotions * version N manifest_sha256 H publisher P
server URL``.

Consumers that would rather be told than poll read this stream (``XREAD BLOCK``) and pull
the version it names. An event is sent after ``latest`` moved; one lost to a crash or an
unreachable Redis is sent at the next daemon start (``announce_if_missed``). ``publisher``
(the daemon's consumer name) and ``server`` (where its HTTP server answers) let the other
daemons pull the bundle from it (bundle_follow.py).

With ``cluster.key`` set, each event carries ``signature``: an HMAC-SHA256 over its other
fields, which the daemons sharing the key check before they act on the event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from aftertune.daemon.settings import Settings
from aftertune.store.bundles import Published, latest_version, published
from aftertune.store.layout import StateLayout

log = logging.getLogger(__name__)

MAXLEN = 10_000  # approximate cap: the stream is a notification channel, not the registry
SIGNED_FIELDS = ("version", "manifest_sha256", "published_at", "publisher", "server")


@dataclass(frozen=True)
class Promotion:
    """One event of the promotions stream."""

    entry_id: str
    version: int
    manifest_sha256: str
    publisher: str = ""
    server: str = ""
    published_at: str = ""
    signature: str = ""

    def signed_with(self, key: bytes) -> bool:
        """Whether ``signature`` is the one ``key`` gives these fields (constant-time)."""
        fields = {
            "version": str(self.version),
            "manifest_sha256": self.manifest_sha256,
            "published_at": self.published_at,
            "publisher": self.publisher,
            "server": self.server,
        }
        # As bytes: compare_digest refuses a str with non-ASCII characters, which a forger sends.
        return hmac.compare_digest(self.signature.encode(), signature(fields, key).encode())


def signature(fields: Mapping[str, str], key: bytes) -> str:
    """HMAC-SHA256 (hex) over ``SIGNED_FIELDS`` in order, as a JSON array: no value can
    borrow another's bytes."""
    message = json.dumps([fields.get(name, "") for name in SIGNED_FIELDS]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def announce(
    client: redis.Redis,
    stream: str,
    bundle: Published,
    publisher: str = "",
    server: str = "",
    key: bytes | None = None,
) -> str:
    """Send the promotion event for ``bundle``, signed when ``key`` is given; returns the
    entry id."""
    fields: dict[Any, Any] = {  # what redis-py's xadd is typed to take
        "version": str(bundle.version),
        "manifest_sha256": bundle.manifest_sha256,
        "published_at": f"{time.time():.3f}",
        "publisher": publisher,
        "server": server,
    }
    if key is not None:
        fields["signature"] = signature(fields, key)
    entry = client.xadd(stream, fields, maxlen=MAXLEN, approximate=True)
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
        found.get("published_at", ""),
        found.get("signature", ""),
    )


def newest_promotion(client: redis.Redis, stream: str) -> Promotion | None:
    entries: Any = client.xrevrange(stream, count=1)
    return promotion(entries[0][0], entries[0][1]) if entries else None


def last_announced(client: redis.Redis, stream: str) -> tuple[int, str] | None:
    """(version, manifest_sha256) of the newest event on ``stream``, if any."""
    event = newest_promotion(client, stream)
    return (event.version, event.manifest_sha256) if event else None


def announce_if_missed(
    client: redis.Redis,
    stream: str,
    bundles_dir: Path,
    publisher: str = "",
    server: str = "",
    key: bytes | None = None,
) -> str | None:
    """Announce ``latest`` when the stream's newest event names another bundle."""
    version = latest_version(bundles_dir)
    if version is None:
        return None
    bundle = published(bundles_dir, version)
    if last_announced(client, stream) == (bundle.version, bundle.manifest_sha256):
        return None
    return announce(client, stream, bundle, publisher, server, key)


def _text(value: bytes | str) -> str:
    # A forged field may hold any bytes: replaced, they cannot stop the follower's thread.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


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
        key=cluster_key(settings),
    )


def cluster_key(settings: Settings) -> bytes | None:
    """``cluster.key`` as the bytes events are signed and checked with; None when unset."""
    key = settings.cluster.key
    return key.get_secret_value().encode() if key is not None else None
