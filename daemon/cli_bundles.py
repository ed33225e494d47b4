"""CLI commands for consumers: ``pull`` a published bundle, ``generate`` an answer from one.

Neither imports torch: a consumer machine needs ONNX Runtime and this package, nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from aftertune.daemon.errors import DaemonError
from aftertune.daemon.settings import Settings
from aftertune.daemon.tables import size
from aftertune.store.layout import StateLayout


def register_bundle_commands(sub: Any, common: argparse.ArgumentParser) -> None:
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

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="answer with a pulled bundle (ONNX Runtime; one record or a JSONL file)",
        description="Verify and load a bundle, render the prompt template from its manifest "
        "and print the answer: greedy decoding for a generative bundle, the nearest of the "
        "task's candidate answers for a ranking bundle (which needs --task). With --jsonl, "
        "answer every record of a file (wire format: instruction, input, task, id; output "
        "ignored) and print one JSON line per record, in order: {task, answer} plus id when "
        "given. A malformed line stops the run before any answer, naming the line. Use it "
        "to try a bundle by hand, or to answer a file of requests from a script.",
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


# --jsonl answers this many records at a time: a ranking bundle groups them by length into
# ONNX calls of --batch-size, and the output still follows the input's order.
ANSWER_BLOCK = 1024


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.consumer import Bundle

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise DaemonError("--max-new-tokens and --batch-size must be at least 1")
    if args.jsonl is not None:
        if args.instruction is not None or args.prompt is not None:
            raise DaemonError("--jsonl answers a file: leave out --instruction and --prompt")
        records = read_requests(args.jsonl)
        bundle = Bundle.open(args.bundle)
        for start in range(0, len(records), ANSWER_BLOCK):
            chunk = records[start : start + ANSWER_BLOCK]
            answers = bundle.answer_many(
                [(r.get("task"), r["instruction"], r["input"]) for r in chunk], args.batch_size
            )
            for record, answer in zip(chunk, answers, strict=True):
                out = {"task": record.get("task"), "answer": answer}
                if "id" in record:
                    out["id"] = record["id"]
                print(json.dumps(out, ensure_ascii=False))
        return 0
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


def read_requests(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file to answer; a malformed line is an error naming it."""
    import sys

    text = sys.stdin.read() if str(path) == "-" else _read_text(path)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DaemonError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise DaemonError(f"{path}:{number}: a record is a JSON object")
        for key in ("instruction", "input", "task"):
            if key in record and record[key] is not None and not isinstance(record[key], str):
                raise DaemonError(f"{path}:{number}: {key!r} must be a string")
        if not (record.get("instruction") or "").strip():
            raise DaemonError(f"{path}:{number}: 'instruction' is missing or empty")
        record["input"] = record.get("input") or ""
        records.append(record)
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DaemonError(f"cannot read {path}: {exc}") from None
