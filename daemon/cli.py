"""The `aftertune` command line. Light commands (push, status, dlq) never import torch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from aftertune.daemon.cli_bundles import register_bundle_commands
from aftertune.daemon.cli_deploy import register_deploy_commands
from aftertune.daemon.cli_models import EXIT_CODES_HELP, register_model_commands
from aftertune.daemon.cli_quarantine import register_quarantine_commands
from aftertune.daemon.errors import DaemonError, RedisUnavailable
from aftertune.daemon.interrupt import interrupt_flag
from aftertune.daemon.settings import Settings, load_settings
from aftertune.learners.errors import LearnerError
from aftertune.store.errors import StoreError
from aftertune.store.records import printable

log = logging.getLogger("aftertune")

Command = Callable[[argparse.Namespace, Settings], int]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    sup = argparse.SUPPRESS
    group.add_argument("--config", type=Path, default=sup, help="TOML config (or AFTERTUNE_CONFIG)")
    group.add_argument(
        "--state-dir", type=Path, default=sup, help="state directory (default ./.aftertune)"
    )
    group.add_argument(
        "--redis-url", default=sup, help="Redis URL; unset = embedded Redis in the state dir"
    )
    group.add_argument(
        "--store-url", default=sup, help="postgresql:// URL; unset = SQLite in the state dir"
    )
    group.add_argument(
        "--log-level",
        default=sup,
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="any case: debug, INFO...",
    )
    group.add_argument(
        "--log-format", default=sup, choices=["text", "json"], help="json = JSON lines"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="aftertune",
        parents=[common],
        description=textwrap.fill(
            "Keep a deployed language model learning from labelled feedback without "
            "forgetting. Producers XADD records to a Redis stream; the daemon stores them, "
            "trains LoRA adapters with replay and EWC, gates and publishes them."
        ),
        epilog=textwrap.fill(
            "Settings come from --config TOML, AFTERTUNE_* environment variables "
            "(AFTERTUNE_REDIS__URL=...) and these options. See README.md."
        )
        + "\n\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aftertune {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_push, _add_serve, _add_demo, _add_status, _add_dlq, _add_store):
        add(sub, common)
    _add_completion(sub, common)
    register_model_commands(sub, common)
    register_bundle_commands(sub, common)
    register_deploy_commands(sub, common)
    register_quarantine_commands(sub, common)
    return parser


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's, once installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aftertune")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown (not installed)"


def _add_push(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "push",
        parents=[common],
        help="push JSONL feedback records to the stream",
        description="Send each non-empty line of FILE (or standard input) as one record to "
        "the feedback stream (redis.stream). Use it to feed labelled examples by hand or from "
        "a script; a program can use the Producer class or XADD instead. Nothing is stored "
        "yet: a running daemon (or `aftertune serve --burst`) ingests the records, and a line "
        "that is not a valid record goes to the dead-letter stream with its reason (`aftertune "
        "dlq list`). --validate checks every line here first and sends only the valid ones; "
        "exit 1 when any line was left out.",
    )
    p.add_argument("file", help="JSONL file, one record per line; '-' reads standard input")
    p.add_argument(
        "--validate",
        action="store_true",
        help="check every line locally first; invalid lines are reported by line number and not sent",
    )
    p.add_argument(
        "--split",
        choices=["auto", "train", "test"],
        default=None,
        help="the split of records that name none (test: held-out, e.g. a file of golden records)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_push)


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run the daemon: ingest, learn on schedule, serve bundles, until SIGTERM",
        description="Ingest feedback continuously; start a learning cycle when "
        "cycle.min_new_examples new examples wait (or every cycle.interval_s when any do) "
        "while holding the Redis trainer lock; serve /healthz, /readyz, /metrics and bundles "
        "on server.host:server.port. SIGTERM/SIGINT: warm stop (the cycle checkpoints), a "
        "second one: cold stop. SIGHUP: reload gate and cycle settings. Speaks sd_notify "
        "(READY, WATCHDOG, STATUS, STOPPING) when systemd sets NOTIFY_SOCKET. Use it as the "
        "long-running service (systemd/aftertune.service runs it); --burst only ingests "
        "what waits, then exits, for scripts.",
    )
    p.add_argument(
        "--burst",
        action="store_true",
        help="ingest until the stream and the pending list are drained, then exit 0",
    )
    p.set_defaults(func=cmd_serve)


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="the whole loop on real text in a few minutes (what `make run` runs)",
        description="Start the daemon (embedded Redis, an embedded base) in "
        "STATE_DIR/demo-minilm, or STATE_DIR/demo for --base embedded:tiny (wiped first; each "
        "keeps the other's), push feedback for a task (or two), then another, then a poisoned "
        "batch (a known task with flipped labels); wait for two promotions and a rejection; "
        "pull the latest bundle over HTTP and answer with ONNX Runtime; print a summary "
        "(the gate's figures, per-task accuracy before and after) and the HTML report's path; "
        "stop the daemon. On embedded:minilm (the default) it learns real text: news topics, "
        "then emotions; --base embedded:tiny (`make run-tiny`) learns character puzzles. Use "
        "it to see the whole loop work on this machine before feeding it your own data.",
    )
    p.add_argument(
        "--base",
        choices=("embedded:minilm", "embedded:tiny"),
        default="embedded:minilm",
        help="embedded:minilm (real text, the default) or embedded:tiny (character "
        "puzzles); each under 2 min on 2 idle cores",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for each step (default 300)"
    )
    p.set_defaults(func=cmd_demo)


def _add_status(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        parents=[common],
        help="stream, store and champion at a glance",
        description="Show the feedback stream (entries, unread, pending, dead-lettered), the "
        "stored examples per task (train and held-out), the champion and when it was "
        "promoted, a daemon running on this state dir (its pid, what it does, where it "
        "serves) and a learning cycle in progress in any process (its phase, pid and start "
        "time). Use it to see whether feedback arrives and is stored, and what is learning "
        "now; --watch refreshes it.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C; with --json, one JSON line each time",
    )
    p.set_defaults(func=cmd_status)


def _add_dlq(sub: Any, common: argparse.ArgumentParser) -> None:
    dlq = sub.add_parser(
        "dlq",
        parents=[common],
        help="inspect and requeue dead-lettered entries",
        description="Entries of the feedback stream that are not a valid record (not JSON, "
        "a missing or invalid field, over ingest.max_record_bytes, no 'record' field, an id "
        "reused with other content) go to the dead-letter stream (redis.dead_letter_stream) "
        "with their reason instead of the store. `dlq list` shows them; `dlq requeue` sends "
        "them back once the cause is fixed.",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    p = dlq_sub.add_parser(
        "list",
        parents=[common],
        help="list dead letters with their reasons",
        description="Print each dead letter: its id, the id it had on the feedback stream, "
        "why it was rejected and the start of its payload. Use it when `status` counts dead "
        "letters or a producer's records do not show up as examples.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=None, help="show at most this many")
    p.set_defaults(func=cmd_dlq_list)
    p = dlq_sub.add_parser(
        "requeue",
        parents=[common],
        help="put dead letters back on the stream",
        description="Put the named dead letters (or --all) back on the feedback stream as "
        "they arrived, for the daemon to ingest again. Use it when a setting rejected them "
        "(ingest.max_record_bytes, say) and you have changed it; a record that is itself "
        "wrong is rejected again, so push a corrected one instead. A payload truncated when "
        "it was dead-lettered cannot be requeued: exit 1, naming each one left.",
    )
    p.add_argument("ids", nargs="*", help="dead-letter ids (from `dlq list`)")
    p.add_argument("--all", action="store_true", help="requeue every dead letter")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dlq_requeue)


def _add_completion(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a tab-completion script for the shell. Bash: "
        "`aftertune completion bash > ~/.local/share/bash-completion/completions/aftertune`; "
        'zsh: `aftertune completion zsh > "${fpath[1]}/_aftertune"`.',
    )
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    p.set_defaults(func=cmd_completion)


def _add_store(sub: Any, common: argparse.ArgumentParser) -> None:
    store = sub.add_parser(
        "store",
        parents=[common],
        help="the durable store's schema",
        description="The example store and the model registry (SQLite in the state dir, or "
        "PostgreSQL at store.url) and their schema version.",
    )
    store_sub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = store_sub.add_parser(
        "migrate",
        parents=[common],
        help="bring the store's schema up to this version's (the daemon also does on start)",
        description="Create the tables, or upgrade a store an earlier aftertune made, one "
        "step per schema version, each in one transaction; print each step, or that the "
        "schema is up to date. Use it after an upgrade or before starting daemons on a new "
        "shared PostgreSQL; a daemon does the same when it starts.",
    )
    p.set_defaults(func=cmd_store_migrate)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "state_dir" in args:
        out["state_dir"] = str(args.state_dir)
    if "redis_url" in args:
        out["redis"] = {"url": args.redis_url}
    if "store_url" in args:
        out["store"] = {"url": args.store_url}
    if "log_level" in args:
        out["log_level"] = args.log_level
    if "log_format" in args:
        out["log_format"] = args.log_format
    return out


@contextmanager
def _redis(settings: Settings) -> Iterator[redis.Redis]:
    from aftertune.daemon.embedded_redis import redis_connection

    try:
        with redis_connection(settings.redis.url, settings.state_dir) as client:
            client.ping()
            yield client
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        where = settings.redis.url or "the embedded server"
        raise RedisUnavailable(f"cannot reach Redis at {where}: {exc}") from None


def _open_store(settings: Settings) -> Any:
    from aftertune.store.examples import ExampleStore

    return ExampleStore.in_state_dir(settings.state_dir, settings.store.url)


def cmd_push(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.consumer.producer import Producer

    stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    rejected = 0

    def lines() -> Iterator[bytes]:
        nonlocal rejected
        if args.validate:
            from aftertune.store.errors import RecordError
            from aftertune.store.records import parse_record
        for number, raw in enumerate(stream, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            if args.split is not None:
                line = _with_split(line, args.split)
            if args.validate:
                try:
                    parse_record(line, max_bytes=settings.ingest.max_record_bytes)
                except RecordError as exc:
                    rejected += 1
                    print(f"line {number}: {printable(exc.reason)}", file=sys.stderr)
                    continue
            yield line

    with stream, _redis(settings) as client:
        sent = Producer(client=client, stream=settings.redis.stream).push(lines())
    if args.json:
        print(json.dumps({"sent": sent, "rejected": rejected, "stream": settings.redis.stream}))
    else:
        print(f"sent {sent} records to {settings.redis.stream}")
    if rejected:
        print(f"rejected {rejected} invalid lines (not sent)", file=sys.stderr)
        return 1
    return 0


def _with_split(line: bytes, split: str) -> bytes:
    """``line`` with ``split`` set when it is a JSON object that names none; else as it is
    (a bad line goes on, to be dead-lettered with its reason)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or "split" in record:
        return line
    return json.dumps({**record, "split": split}, ensure_ascii=False).encode()


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.service import serve

    return serve(
        settings,
        burst=args.burst,
        config=getattr(args, "config", None) or _env_config(),
        overrides=_overrides(args),
    )


def _env_config() -> Path | None:
    value = os.environ.get("AFTERTUNE_CONFIG")
    return Path(value) if value else None


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.demo import run_demo

    return run_demo(settings, timeout_s=args.timeout, base=args.base)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.status import gather_status, render_status
    from aftertune.store.registry import Registry

    if args.watch is not None and not 0 < args.watch <= 3600:
        raise DaemonError("--watch takes seconds between refreshes, more than 0 and at most 3600")
    with (
        _redis(settings) as client,
        _open_store(settings) as store,
        Registry(settings.state_dir, settings.store.url) as registry,
    ):
        if args.watch is None:
            status = gather_status(client, store, registry, settings)
            print(json.dumps(status, indent=2) if args.json else render_status(status))
            return 0
        with interrupt_flag() as interrupted:
            try:
                while not interrupted.seen:
                    status = gather_status(client, store, registry, settings)
                    if args.json:
                        print(json.dumps(status), flush=True)
                    else:
                        text = render_status(status)
                        _redraw(f"{text}\n\nevery {args.watch:g} s; Ctrl-C to stop")
                    if not interrupted.seen:
                        time.sleep(args.watch)
            except KeyboardInterrupt:  # how a watch ends
                pass
        return 0


def _redraw(text: str) -> None:
    """Replace the screen's contents on a terminal; elsewhere, separate the frames."""
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
    else:
        sys.stdout.write(text + "\n\n")
    sys.stdout.flush()


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.dead_letter import list_dead_letters

    with _redis(settings) as client:
        letters = list_dead_letters(client, settings.redis.dead_letter_stream, args.limit)
    if args.json:
        print(json.dumps([d.to_json() for d in letters], indent=2))
        return 0
    for d in letters:
        print(d.describe())
    print(f"{len(letters)} dead letters")
    return 0


def cmd_dlq_requeue(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.dead_letter import requeue

    if not args.ids and not args.all:
        raise DaemonError("name dead-letter ids to requeue, or pass --all")
    cfg = settings.redis
    with _redis(settings) as client:
        done, problems = requeue(
            client, cfg.dead_letter_stream, cfg.stream, None if args.all else args.ids
        )
    for problem in problems:
        print(printable(problem), file=sys.stderr)
    if args.json:
        print(json.dumps({"requeued": done, "stream": cfg.stream, "problems": problems}))
    else:
        print(f"requeued {done} entries onto {cfg.stream}")
    return 1 if problems else 0


def cmd_completion(args: argparse.Namespace, settings: Settings) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_store_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.examples import ExampleStore
    from aftertune.store.registry import Registry

    url = settings.store.url
    with (
        ExampleStore.in_state_dir(settings.state_dir, url) as store,
        Registry(settings.state_dir, url) as registry,
    ):
        for database in (store.db, registry.db):
            for step in database.migrated or ["schema up to date"]:
                print(f"{database.where}: {step}")
    return 0


def _offline_and_quiet() -> None:
    """No hub access ever; transformers' own progress bars and deprecation chatter off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@contextmanager
def _stdout_only_for_the_answer(json_only: bool) -> Iterator[None]:
    """With ``--json``, stdout carries the command's JSON and nothing else.

    While the command runs, file descriptor 1 points at stderr, so whatever a library or a
    subprocess writes there (torch.onnx's progress lines, native code) lands in the log
    stream; ``sys.stdout``, where the command prints its answer, keeps the real stdout.
    """
    if not json_only:
        yield
        return
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    saved, sys.stdout = sys.stdout, open(real, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout.close()
        sys.stdout = saved
        os.dup2(real, 1)
        os.close(real)


def main(argv: Sequence[str] | None = None) -> int:
    _offline_and_quiet()
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(getattr(args, "config", None), _overrides(args))
        from aftertune.daemon.logs import configure_logging

        # Only the daemon talks at INFO by default; one-shot commands print their answer,
        # unless a log was asked for (--log-level, or --log-format: progress, events).
        asked = "log_level" in args or "log_format" in args
        long_running = args.command in ("serve", "answer-server") or getattr(args, "follow", False)
        quiet = not long_running and not asked
        configure_logging("WARNING" if quiet else settings.log_level, settings.log_format)
        if quiet:  # progress still shows: a bar on a terminal, an event now and then elsewhere
            logging.getLogger("aftertune.progress").setLevel(logging.INFO)
        func: Command = args.func
        with _stdout_only_for_the_answer(bool(getattr(args, "json", False))):
            return func(args, settings)
    # Errors can quote input (a path, a manifest's contents, a server's answer): escaped.
    except DaemonError as exc:
        print(f"aftertune: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except (StoreError, LearnerError) as exc:
        print(f"aftertune: {printable(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`aftertune models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports SIGPIPE
    except OSError as exc:  # a path that is missing, not a directory, not writable...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"aftertune: {printable(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
