"""``aftertune quarantine``: what the gate and the data checks set aside, and releasing it.

A rejected batch's records are quarantined: never trained on or judged again. ``list``
shows them by the version that rejected them (0: the data checks before training), task and
reason; ``release`` puts them back in service as new data, which the next cycle learns and
judges again (every release is logged with who did it and why).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from aftertune.daemon.settings import Settings
from aftertune.daemon.tables import table

log = logging.getLogger(__name__)


def register_quarantine_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    q = sub.add_parser(
        "quarantine",
        parents=[common],
        help="list or release the records the gate set aside",
        description="Records of a rejected batch are quarantined: they are neither trained "
        "on nor judged again, and `status` counts them apart. List them by the version that "
        "rejected them (v0: the data checks, before any training), task and reason; release "
        "them when the rejection was wrong, so the next cycle learns them as new data.",
    )
    actions = q.add_subparsers(dest="quarantine_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "list",
        parents=[common],
        help="what is quarantined, by version, task and reason",
        description="One row per rejecting version, task and reason: how many records, their "
        "seq range. Version 0 is the data checks that run before training.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_quarantine_list)
    p = actions.add_parser(
        "release",
        parents=[common],
        help="put quarantined records back in service as new data",
        description="Release the records a version (or the data checks, --version 0) "
        "quarantined, or a task's, or all of them. They move after every stored record, so "
        "the next cycle trains on them and the gate judges them again. Give --reason: it is "
        "logged with who released them.",
    )
    p.add_argument(
        "--version", type=int, default=None, help="the rejecting version (0: data checks)"
    )
    p.add_argument("--task", default=None, help="only this task's records")
    p.add_argument("--all", action="store_true", help="every quarantined record")
    p.add_argument("--reason", required=True, help="why, logged with who released them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_quarantine_release)


def cmd_quarantine_list(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.examples import ExampleStore

    with ExampleStore.in_state_dir(settings.state_dir, settings.store.url) as store:
        batches = store.quarantine_summary()
    if args.json:
        print(json.dumps([b.__dict__ for b in batches]))
        return 0
    if not batches:
        print("nothing is quarantined")
        return 0
    rows = [
        [
            f"v{b.version}" if b.version else "data checks",
            b.task,
            b.count,
            f"{b.first}-{b.last}",
            b.reason,
        ]
        for b in batches
    ]
    print(table(["rejected by", "task", "records", "seq", "reason"], rows))
    return 0


def cmd_quarantine_release(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.cli_models import _actor
    from aftertune.daemon.errors import DaemonError
    from aftertune.store.examples import ExampleStore

    if args.version is None and args.task is None and not args.all:
        raise DaemonError("say what to release: --version N, --task NAME, or --all")
    with ExampleStore.in_state_dir(settings.state_dir, settings.store.url) as store:
        released = store.release(version=args.version, task=args.task)
    log.warning(
        "%s released %d quarantined records (version %s, task %s): %s",
        _actor(),
        released,
        "any" if args.version is None else args.version,
        args.task or "any",
        args.reason,
    )
    if args.json:
        print(json.dumps({"released": released}))
    else:
        print(f"released {released} records: the next cycle learns them as new data")
    return 0
