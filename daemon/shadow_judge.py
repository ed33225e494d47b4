"""The daemon's side of shadow evaluation: which version answer servers should shadow, and
the reports they send back, tallied and handed to the gate (``learners/shadow_gate.py``).

Reports come from Redis, so anyone who can write to it can forge one. What is counted is
bounded by what the daemon can check (``store/shadow.py``): only reports on the version in
shadow evaluation *and* on the bundle the registry recorded for it (its manifest sha256),
only entries added since that version began waiting, the newest report of each answer
server. A forger can hold back a challenger that passed every held-out check, or let it
through as if shadow evaluation were off; never promote a version the gate rejected or did
not judge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from aftertune.daemon.settings import Settings
from aftertune.store.registry import Registry
from aftertune.store.shadow import ShadowTally, shadow_candidate, stream_id_since, tally

log = logging.getLogger(__name__)

PAGE = 1000  # entries per XRANGE
MAX_ENTRIES = 200_000  # read at most this many reports per judgment (answer servers cap the
# stream at about 10,000)


@dataclass(frozen=True)
class ShadowJudgment:
    """One look at the version in shadow evaluation: the verdict and what it was judged on."""

    version: int
    status: str  # 'waiting', 'passed', 'failed' or 'timed_out'
    tally: ShadowTally


def candidate_version(settings: Settings) -> int | None:
    """The version in shadow evaluation (``GET /v1/models/candidate``); None: none."""
    with Registry(settings.state_dir, settings.store.url) as registry:
        found = shadow_candidate(registry)
    return found.version if found is not None else None


def read_reports(client: redis.Redis, stream: str, since: float) -> list[dict[Any, Any]]:
    """The fields of every entry of ``stream`` added at or after ``since`` (seconds since the
    epoch), oldest first, at most MAX_ENTRIES."""
    out: list[dict[Any, Any]] = []
    start = stream_id_since(since)
    while len(out) < MAX_ENTRIES:
        page: Any = client.xrange(stream, min=start, count=PAGE)
        out += [fields for _, fields in page]
        if len(page) < PAGE:
            break
        start = "(" + (page[-1][0].decode() if isinstance(page[-1][0], bytes) else page[-1][0])
    return out


def judge_shadow(settings: Settings, client: redis.Redis) -> ShadowJudgment | None:
    """Tally the reports on the version in shadow evaluation and let the gate act on them.
    None when no version is in shadow evaluation. Runs in the cycle thread (it may promote)."""
    from aftertune.daemon.learning import workspace
    from aftertune.learners.shadow_gate import SHADOW, settle_shadow

    with workspace(settings) as ws:
        registry = ws.state.registry
        version = shadow_candidate(registry)
        if version is None:
            return None
        publication = registry.publication(version.version)
        if publication is None:  # exported before the registry recorded it: nothing to count
            return ShadowJudgment(version.version, "waiting", ShadowTally())
        since = float(version.gate[SHADOW].get("since", 0.0))
        try:
            entries = read_reports(client, settings.redis.shadow_stream, since)
        except redis.RedisError as exc:
            log.warning("shadow reports not read (%s); judged again later", exc)
            return ShadowJudgment(version.version, "waiting", ShadowTally())
        counted = tally(entries, version.version, publication.manifest_sha256)
        verdict, _ = settle_shadow(ws.state, version, counted)
    return ShadowJudgment(version.version, verdict.status.value, counted)
