"""CLI commands for consumers: ``pull`` a published bundle, ``generate`` an answer from one.

Neither imports torch: a consumer machine needs ONNX Runtime and this package, nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftertune.daemon.errors import DaemonError
from aftertune.daemon.settings import Settings
from aftertune.daemon.tables import size
from aftertune.store.errors import BundleError
from aftertune.store.layout import StateLayout

if TYPE_CHECKING:
    from aftertune.store.consumer import Bundle


def register_bundle_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    _add_pull(sub, common)
    _add_generate(sub, common)


def _add_pull(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "pull",
        parents=[common],
        help="download, verify and install a published bundle (DIR/current → DIR/vN)",
        description="Download a bundle into DIR/.pull-*, check every file's sha256 and size "
        "against the manifest, rename it to DIR/vN and switch the DIR/current symlink. A "
        "mismatch exits 1 naming the file and leaves DIR/current untouched; nothing is "
        "downloaded when DIR/current already is that bundle. Use it on a machine that "
        "answers with the model (`aftertune generate --bundle DIR/current`, or the Bundle "
        "class): run it again to update, or with --version to pin one. DIR defaults to "
        "STATE_DIR/consumer. With --follow it keeps running and keeps DIR/current at the "
        "latest promoted version (see `aftertune answer-server` to serve it).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="a daemon's HTTP server, e.g. http://127.0.0.1:8760")
    source.add_argument(
        "--from", dest="from_dir", type=Path, help="a state directory on this machine"
    )
    p.add_argument(
        "--to", type=Path, default=None, help="install directory (DIR; default STATE_DIR/consumer)"
    )
    p.add_argument("--version", default="latest", help="3, v3 or 'latest' (default)")
    p.add_argument(
        "--token",
        default=os.environ.get("AFTERTUNE_TOKEN"),
        help="bearer token of the server (default: $AFTERTUNE_TOKEN)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep running: pull every promotion as it happens (needs --server; waits on the "
        "promotions stream when --redis-url is given, else long-polls the server)",
    )
    p.add_argument(
        "--exec",
        dest="exec_cmd",
        metavar="CMD",
        help="with --follow: shell command run after each switch (AFTERTUNE_VERSION and "
        "AFTERTUNE_BUNDLE in its environment)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="with --follow: seconds one long poll or stream read waits (default 30)",
    )
    p.set_defaults(func=cmd_pull)


def _add_generate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="answer with a pulled bundle (ONNX Runtime; one record or a JSONL file)",
        description="Verify and load a bundle, render the prompt template from its manifest "
        "and print the answer: greedy decoding for a generative bundle, the nearest of the "
        "task's candidate answers for a ranking bundle (which needs --task). With --jsonl, "
        "answer every record of a file (wire format: instruction, input, task, id; output "
        "ignored), one JSON line out per line in, as they come: {task, answer} (+ id), or "
        "{line, error} for a malformed line (on stderr too; the rest are answered, exit 1). "
        "Use it to try a bundle by hand, or to answer a file of requests from a script.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle dir, e.g. DIR/current")
    p.add_argument("--task", help="the task (ranking bundles rank among its known answers)")
    p.add_argument("--instruction", help="the instruction (rendered with the bundle's template)")
    p.add_argument("--input", default="", help="the input, may be empty")
    p.add_argument("--prompt", help="a raw prompt instead of --instruction/--input (generative)")
    p.add_argument("--jsonl", type=Path, help="answer every record of this file ('-': stdin)")
    p.add_argument("--batch-size", type=int, default=32, help="records per ONNX call (--jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generative bundles only")
    p.add_argument("--json", action="store_true", help="print {task, answer} as JSON")
    p.set_defaults(func=cmd_generate)


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.consumer.pull import DirSource, HttpSource, Source, pull

    if args.follow or args.exec_cmd:
        from aftertune.daemon.cli_deploy import cmd_follow

        return cmd_follow(args, settings)
    source: Source = (
        HttpSource(args.server, args.token) if args.server else DirSource(args.from_dir)
    )
    started = time.monotonic()
    result = pull(source, args.to or StateLayout(settings.state_dir).consumer, args.version)
    seconds = time.monotonic() - started
    if args.json:
        print(
            json.dumps(
                {
                    "version": result.version,
                    "path": str(result.path),
                    "manifest_sha256": result.manifest_sha256,
                    "downloaded": result.downloaded,
                    "bytes": result.bytes,
                    "seconds": round(seconds, 3),
                }
            )
        )
    elif result.downloaded:
        rate = f", {size(round(result.bytes / seconds))}/s" if seconds > 0 else ""
        print(
            f"v{result.version} verified ({size(result.bytes)} in {seconds:.1f} s{rate}, every "
            f"sha256) and installed: {result.path}"
        )
    else:
        print(f"v{result.version} is already current: {result.path}")
    return 0


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.consumer import Bundle

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise DaemonError("--max-new-tokens and --batch-size must be at least 1")
    if args.jsonl is not None:
        if args.instruction is not None or args.prompt is not None:
            raise DaemonError("--jsonl answers a file: leave out --instruction and --prompt")
        return answer_file(Bundle.open(args.bundle), args.jsonl, args.batch_size)
    if (args.prompt is None) == (args.instruction is None):
        raise DaemonError("give --instruction (and --input) or --prompt, or --jsonl FILE")
    bundle = Bundle.open(args.bundle)
    if args.prompt is not None:
        answer = bundle.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    elif bundle.candidates:
        answer = bundle.answer(args.task, args.instruction, args.input)
    else:
        answer = bundle.generate(
            instruction=args.instruction, input=args.input, max_new_tokens=args.max_new_tokens
        )
    print(
        json.dumps({"task": args.task, "answer": answer}, ensure_ascii=False)
        if args.json
        else answer
    )
    return 0


def answer_file(bundle: Bundle, path: Path, batch_size: int) -> int:
    """Answer every line of ``path`` in order, one JSON line out per request line in, a block
    of ``batch_size`` at a time (memory stays bounded). A bad line's output is
    ``{"line": N, "error": ...}`` (also on stderr) and the run goes on; exit status 1 then."""
    from aftertune.daemon.jsonl_requests import BadLine, Request, read_requests

    # A ranking bundle embeds a block per ONNX call; a generative one answers one at a time,
    # so each answer is printed as soon as its line is read.
    block_size = batch_size if bundle.candidates else 1
    bad = 0
    block: list[Request | BadLine] = []
    for item in read_requests(path):
        block.append(item)
        if sum(isinstance(r, Request) for r in block) >= block_size:
            bad += _answer_block(bundle, block, batch_size)
            block = []
    bad += _answer_block(bundle, block, batch_size)
    if bad:
        print(f"{bad} line(s) of {path} not answered; each has an error line", file=sys.stderr)
    return 1 if bad else 0


def _answer_block(bundle: Bundle, block: list[Any], batch_size: int) -> int:
    """Answer ``block`` (requests and bad lines, in order), print one line each; bad count."""
    from aftertune.daemon.jsonl_requests import BadLine, Request

    requests = [r for r in block if isinstance(r, Request)]
    answers: dict[int, str | BundleError] = {}
    try:
        got = bundle.answer_many([(r.task, r.instruction, r.input) for r in requests], batch_size)
        answers = {r.line: a for r, a in zip(requests, got, strict=True)}
    except BundleError:
        for r in requests:  # one at a time, to tell which line the bundle refused
            try:
                answers[r.line] = bundle.answer(r.task, r.instruction, r.input)
            except BundleError as exc:
                answers[r.line] = exc
    bad = 0
    for item in block:
        out: dict[str, Any]
        if isinstance(item, BadLine):
            out, error = {"line": item.line, "error": item.error}, item.error
        else:
            answer = answers[item.line]
            if isinstance(answer, BundleError):
                error = f"line {item.line}: {answer}"
                out = {"line": item.line, "error": error}
            else:
                out, error = {"task": item.task, "answer": answer}, ""
            if item.has_id:
                out["id"] = item.id
        if error:
            bad += 1
            print(error, file=sys.stderr)
        print(json.dumps(out, ensure_ascii=False))
    sys.stdout.flush()
    return bad
