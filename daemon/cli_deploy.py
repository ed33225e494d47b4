"""CLI commands for a consumer host: ``pull --follow`` and ``answer-server``.

Neither imports torch: a consumer machine needs ONNX Runtime and this package, nothing else.
"""

from __future__ import annotations

import argparse

from aftertune.daemon.errors import DaemonError
from aftertune.daemon.settings import Settings
from aftertune.store.layout import StateLayout


def cmd_follow(args: argparse.Namespace, settings: Settings) -> int:
    """``aftertune pull --follow``: pull every promotion until SIGTERM."""
    from aftertune.store.consumer.follow import Follower, FollowSpec
    from aftertune.store.consumer.pull import HttpSource

    if not args.follow:
        raise DaemonError("--exec runs after each switch of --follow: add --follow")
    if not args.server:
        raise DaemonError(
            "--follow needs --server URL (a daemon's HTTP server): it long-polls it for "
            "promotions and pulls from it; --from STATE_DIR is for one-shot pulls"
        )
    if args.version != "latest":
        raise DaemonError("--follow follows the latest version: leave out --version")
    try:
        spec = FollowSpec(
            to_dir=args.to or StateLayout(settings.state_dir).consumer,
            redis_url=settings.redis.url,
            stream=settings.redis.promotions_stream,
            wait_s=args.wait,
            exec_cmd=args.exec_cmd,
        )
    except ValueError as exc:
        raise DaemonError(f"--wait: {exc}") from None
    follower = Follower(HttpSource(args.server, args.token), spec)
    follower.install_signal_handlers()
    follower.run()
    return 0
