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
    _add_shadow_options(p)
    p.set_defaults(func=cmd_answer_server)


def _add_shadow_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "shadow evaluation",
        "Also run the challenger the daemon is judging (gate.shadow_requests) on a sample of "
        "live requests, off the request path: clients always get the champion's answer. How "
        "often it agrees with the champion, and with the feedback given on those answers, is "
        "shown on /metrics and reported to the daemon on redis.shadow_stream (needs "
        "--redis-url); the gate promotes the challenger only once enough agree.",
    )
    g.add_argument(
        "--shadow",
        metavar="URL",
        default=None,
        help="the daemon's HTTP server (as for pull --server): its /v1/models/candidate is "
        "pulled with the verified pull and shadowed; unset: no shadow evaluation",
    )
    g.add_argument(
        "--shadow-token",
        default=os.environ.get("AFTERTUNE_TOKEN") or None,
        help="that server's bearer token (default: $AFTERTUNE_TOKEN)",
    )
    g.add_argument(
        "--shadow-rate",
        type=float,
        default=0.1,
        help="share of answered records the challenger answers too (default 0.1)",
    )
    g.add_argument(
        "--shadow-dir",
        type=Path,
        default=None,
        help="where the challenger is pulled (default: 'shadow' beside the --bundle link)",
    )


def _shadow(args: argparse.Namespace, settings: Settings, metrics: Any) -> Any:
    """The shadow of ``--shadow URL``, or None without it."""
    if args.shadow is None:
        return None
    from aftertune.daemon.shadow import Shadow, ShadowMetrics, ShadowSpec
    from aftertune.store.errors import BundleError

    if not settings.redis.url:
        raise DaemonError(
            "--shadow reports to the daemon on its Redis: give --redis-url (or "
            "AFTERTUNE_REDIS__URL) too"
        )
    try:
        spec = ShadowSpec(
            server=args.shadow,
            token=args.shadow_token,
            rate=args.shadow_rate,
            to_dir=args.shadow_dir or Path(os.path.abspath(args.bundle)).parent / "shadow",
            redis_url=settings.redis.url,
            stream=settings.redis.shadow_stream,
        )
        return Shadow(spec, ShadowMetrics(metrics.registry))
    except (ValueError, BundleError) as exc:
        raise DaemonError(f"answer-server --shadow: {exc}") from None


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
    shadow = _shadow(args, settings, metrics)  # its options checked before the bundle opens
    slot = BundleSlot(
        args.bundle,
        on_swap=lambda bundle: (metrics.swaps.inc(), metrics.version.set(bundle.version)),
        on_refused=lambda target, reason: metrics.refused.inc(),
    )
    metrics.version.set(slot.bundle.version)
    sink = StreamSink(settings.redis.url, settings.redis.stream) if settings.redis.url else None
    app = build_answer_app(
        slot, answers, metrics, token=args.token, limits=limits, feedback=sink, shadow=shadow
    )
    server = HttpServer(app, args.host, args.port)
    stop = threading.Event()
    # The handlers only set the flag; this thread acts on it (STYLE.md).
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    server.start()
    slot.start()
    if shadow is not None:
        shadow.start()
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
        if shadow is not None:
            shadow.stop()
        if sink is not None:
            sink.close()
    return 0
