"""What `aftertune status` reports: the stream, the store, the champion."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from aftertune.daemon.running_cycle import read_running_cycle
from aftertune.daemon.settings import Settings
from aftertune.daemon.tables import table
from aftertune.store.examples import ExampleStore
from aftertune.store.layout import StateLayout
from aftertune.store.lookalikes import lookalike_groups, lookalike_letters
from aftertune.store.records import printable
from aftertune.store.registry import Registry

# Redis before 7 does not count a group's unread entries (XINFO GROUPS has no "lag"): they
# are counted here, reading at most this many ids past the group's last delivered one.
UNREAD_COUNT_LIMIT = 1000


def stream_status(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Entries in the stream, unread by the group, pending (read, not acked), dead-lettered.

    ``unread`` is None only when neither Redis nor the count below can say it.
    """
    cfg = settings.redis
    length = int(client.xlen(cfg.stream))
    dead = int(client.xlen(cfg.dead_letter_stream))
    pending = 0
    unread: int | None = None
    try:
        pending = int(client.xpending(cfg.stream, cfg.group)["pending"])
        for group in client.xinfo_groups(cfg.stream):
            if group["name"] in (cfg.group, cfg.group.encode()):
                unread = group.get("lag")
                if unread is None:
                    unread = _count_after(client, cfg.stream, group["last-delivered-id"])
    except redis.ResponseError:  # no stream or no group yet: nothing was ever read
        unread = length
    return {"length": length, "pending": pending, "unread": unread, "dead": dead}


def _count_after(client: redis.Redis, stream: str, last_id: bytes | str) -> int | None:
    """Entries after ``last_id``, or None past UNREAD_COUNT_LIMIT (a bounded read)."""
    last = last_id.decode() if isinstance(last_id, bytes) else str(last_id)
    found = client.xrange(stream, min=f"({last}", max="+", count=UNREAD_COUNT_LIMIT + 1) or []
    return len(found) if len(found) <= UNREAD_COUNT_LIMIT else None


def champion_status(registry: Registry) -> dict[str, Any] | None:
    champion = registry.champion()
    if champion is None:
        return None
    return {
        "version": champion.version,
        "promoted_at": registry.promoted_at(champion.version),
        "metrics": {task: m.get("challenger", {}) for task, m in champion.metrics.items()},
    }


def daemon_status(settings: Settings) -> dict[str, Any] | None:
    """What a running daemon last wrote to ``state_dir/daemon.json`` (None: none runs)."""
    path = StateLayout(settings.state_dir).daemon_status
    try:
        found = json.loads(path.read_text())
        os.kill(int(found["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if isinstance(found, dict) else None


def gather_status(
    client: redis.Redis, store: ExampleStore, registry: Registry, settings: Settings
) -> dict[str, Any]:
    examples = store.counts()
    return {
        "stream": stream_status(client, settings),
        "examples": examples,
        # Stored before ingest refused look-alikes, or by two daemons at one moment.
        "lookalike_tasks": lookalike_groups(examples),
        "quarantined": store.quarantined_counts(),
        "champion": champion_status(registry),
        "daemon": daemon_status(settings),
        "cycle": read_running_cycle(settings.state_dir),  # `aftertune cycle` in any shell
    }


def render_status(status: dict[str, Any]) -> str:
    s = status["stream"]
    unread = s["unread"]
    if unread is None:
        unread = f"more than {UNREAD_COUNT_LIMIT}"
    lines = [
        f"stream: {s['length']} entries; {unread} unread, {s['pending']} pending (read, not "
        f"yet stored), {s['dead']} dead-lettered",
    ]
    examples = status["examples"]
    if examples:
        lines.append(f"examples: {sum(c['train'] + c['test'] for c in examples.values())}")
        rows = [[task, c["train"], c["test"]] for task, c in examples.items()]
        lines.append(table(["task", "train examples", "held-out examples"], rows, indent=2))
    else:
        lines.append("examples: none yet")
    for group in status.get("lookalike_tasks") or []:
        imitations = "; ".join(
            f"{name!r}: {lookalike_letters(name)}" for name in group if lookalike_letters(name)
        )
        lines.append(
            f"look-alike task names: {' and '.join(repr(n) for n in group)} are different "
            f"tasks ({imitations})"
        )
    held = status.get("quarantined") or {}
    if held:
        per_task = ", ".join(f"{task} {n}" for task, n in held.items())
        lines.append(
            f"quarantined: {sum(held.values())} records, not trained or judged ({per_task});"
            " see `aftertune quarantine list`"
        )
    champion = status["champion"]
    lines.append(
        "champion: " + ("none (the base model)" if champion is None else f"v{champion['version']}")
    )
    if champion is not None and champion.get("promoted_at"):
        lines[-1] += (
            f", promoted {time.strftime('%Y-%m-%d %H:%M', time.localtime(champion['promoted_at']))} (local)"
        )
    daemon = status.get("daemon")
    if daemon is None:
        lines.append("daemon: not running")
    else:
        lines.append(f"daemon: pid {daemon['pid']}, {daemon['status']}")
        cycle = daemon.get("cycle") or {}
        if cycle.get("running"):
            lines.append(f"  cycle ({cycle['reason']}): {cycle['state']}")
        if daemon.get("server"):
            lines.append(f"  serving {daemon['server']}")
    cycle = status.get("cycle")
    if cycle is not None:
        started = time.strftime("%H:%M:%S", time.localtime(cycle.get("started_at", 0)))
        lines.append(
            f"cycle in progress: {cycle.get('phase', '?')}; `{cycle.get('command', '?')}`, "
            f"pid {cycle.get('pid')}, started {started} (local)"
        )
    # daemon.json and task names come from outside this process: nothing raw to the terminal.
    return "\n".join(printable(line) if "\n" not in line else line for line in lines)
