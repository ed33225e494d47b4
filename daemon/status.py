"""What `aftertune status` reports: the stream, the store, the champion."""

from __future__ import annotations

import json
import os
from typing import Any

import redis

from aftertune.daemon.settings import Settings
from aftertune.store.examples import ExampleStore
from aftertune.store.layout import StateLayout
from aftertune.store.records import printable
from aftertune.store.registry import Registry


def stream_status(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    cfg = settings.redis
    length = int(client.xlen(cfg.stream))
    dead = int(client.xlen(cfg.dead_letter_stream))
    pending = 0
    lag: int | None = None
    try:
        pending = int(client.xpending(cfg.stream, cfg.group)["pending"])
        for group in client.xinfo_groups(cfg.stream):
            if group["name"] in (cfg.group, cfg.group.encode()):
                lag = group.get("lag")
    except redis.ResponseError:  # no stream or no group yet: nothing was ever read
        lag = length
    return {"length": length, "pending": pending, "unread": lag, "dead": dead}


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
    return {
        "stream": stream_status(client, settings),
        "examples": store.counts(),
        "champion": champion_status(registry),
        "daemon": daemon_status(settings),
    }


def render_status(status: dict[str, Any]) -> str:
    s = status["stream"]
    unread = "?" if s["unread"] is None else s["unread"]
    lines = [
        f"stream: {s['length']} entries, {unread} unread, {s['pending']} pending, "
        f"{s['dead']} dead-lettered",
    ]
    examples = status["examples"]
    if examples:
        lines.append(f"examples: {sum(c['train'] + c['test'] for c in examples.values())}")
        width = max(len(t) for t in examples)
        for task, c in examples.items():
            lines.append(f"  {task:<{width}}  train {c['train']:>7}  test {c['test']:>6}")
    else:
        lines.append("examples: none yet")
    champion = status["champion"]
    lines.append(
        "champion: " + ("none (the base model)" if champion is None else f"v{champion['version']}")
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
    # daemon.json and task names come from outside this process: nothing raw to the terminal.
    return "\n".join(printable(line) for line in lines)
