"""CLI commands for a consumer host: ``pull --follow`` and ``answer-server``.

Neither imports torch: a consumer machine needs ONNX Runtime and this package, nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from aftertune.daemon.answer_log import DEFAULT_MAX_ANSWERS, DEFAULT_TTL_S, AnswerLog
from aftertune.daemon.errors import DaemonError
from aftertune.daemon.settings import Settings
from aftertune.store.layout import StateLayout

log = logging.getLogger(__name__)


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


def register_deploy_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``answer-server`` (``pull --follow`` is an option of ``pull``, cli_bundles.py)."""
    p = sub.add_parser(
        "answer-server",
        parents=[common],
        help="answer over HTTP from a pulled bundle, hot-swapped when DIR/current moves",
        description='Serve POST /v1/answer ({task, instruction, input}, or {"records": '
        "[...]}: {answer, version, answer_id} for each) and POST /v1/feedback ({answer_id, "
        "correction} or {answer_id, rating: up|down}, pushed to the daemon's feedback stream "
        "when --redis-url is given), with /healthz, /readyz and /metrics. When the bundle "
        "link moves (`aftertune pull --follow` switched it), the new bundle is opened and "
        "verified in the background and swapped in atomically; requests in flight finish on "
        "the old one, and a bundle that fails to verify is refused while the old one keeps "
        "answering. Use it on a consumer host beside `pull --follow`. Needs no torch.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle link, e.g. DIR/current")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8770, help="port (default 8770; 0 picks one)")
    p.add_argument(
        "--token",
        default=os.environ.get("AFTERTUNE_ANSWER_TOKEN") or None,
        help="bearer token clients must send (default: $AFTERTUNE_ANSWER_TOKEN; unset: none)",
    )
    p.add_argument("--max-batch", type=int, default=256, help="records per request at most")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit")
    p.add_argument("--batch-size", type=int, default=32, help="records per ONNX call")
    p.add_argument(
        "--keep-answers",
        type=int,
        default=DEFAULT_MAX_ANSWERS,
        help=f"answer ids kept for feedback (default {DEFAULT_MAX_ANSWERS})",
    )
    p.add_argument(
        "--keep-answers-s",
        type=float,
        default=DEFAULT_TTL_S,
        help=f"seconds an answer id is kept for feedback (default {DEFAULT_TTL_S:g})",
    )
    p.set_defaults(func=cmd_answer_server)


def cmd_answer_server(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.answer_feedback import StreamSink
    from aftertune.daemon.answer_metrics import AnswerMetrics
    from aftertune.daemon.answer_server import AnswerLimits, build_answer_app
    from aftertune.daemon.hot_swap import BundleSlot
    from aftertune.daemon.server import HttpServer

    try:
        limits = AnswerLimits(args.max_body_bytes, args.max_batch, args.batch_size)
        answers = AnswerLog(args.keep_answers, args.keep_answers_s)
    except ValueError as exc:
        raise DaemonError(f"answer-server: {exc}") from None
    metrics = AnswerMetrics()
    slot = BundleSlot(
        args.bundle,
        on_swap=lambda bundle: (metrics.swaps.inc(), metrics.version.set(bundle.version)),
        on_refused=lambda target, reason: metrics.refused.inc(),
    )
    metrics.version.set(slot.bundle.version)
    sink = StreamSink(settings.redis.url, settings.redis.stream) if settings.redis.url else None
    app = build_answer_app(slot, answers, metrics, token=args.token, limits=limits, feedback=sink)
    server = HttpServer(app, args.host, args.port)
    stop = threading.Event()
    # The handlers only set the flag; this thread acts on it (STYLE.md).
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    server.start()
    slot.start()
    log.info(
        "answering with v%d from %s on http://%s:%d (feedback %s)",
        slot.bundle.version,
        args.bundle,
        args.host,
        server.port,
        f"to {settings.redis.stream}" if sink else "off: no Redis URL",
    )
    try:
        stop.wait()
    finally:
        log.info("answer server stopping")
        server.stop()
        slot.stop()
        if sink is not None:
            sink.close()
    return 0
