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


def register_bundle_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "pull",
        parents=[common],
        help="download, verify and install a published bundle (DIR/current → DIR/vN)",
        description="Download a bundle into DIR/.pull-*, check every file's sha256 and size "
        "against the manifest, rename it to DIR/vN and switch the DIR/current symlink. A "
        "mismatch exits 1 naming the file and leaves DIR/current untouched; nothing is "
        "downloaded when DIR/current already is that bundle.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="a daemon's HTTP server, e.g. http://127.0.0.1:8760")
    source.add_argument(
        "--from", dest="from_dir", type=Path, help="a state directory on this machine"
    )
    p.add_argument("--to", type=Path, required=True, help="install directory (DIR)")
    p.add_argument("--version", default="latest", help="3, v3 or 'latest' (default)")
    p.add_argument(
        "--token",
        default=os.environ.get("AFTERTUNE_TOKEN"),
        help="bearer token of the server (default: $AFTERTUNE_TOKEN)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="answer with a pulled bundle (ONNX Runtime, greedy)",
        description="Verify and load a bundle, render the prompt template from its manifest "
        "and print the greedy answer.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle dir, e.g. DIR/current")
    p.add_argument("--instruction", help="the instruction (rendered with the bundle's template)")
    p.add_argument("--input", default="", help="the input, may be empty")
    p.add_argument("--prompt", help="a raw prompt instead of --instruction/--input")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_generate)


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.pull import DirSource, HttpSource, Source, pull

    source: Source = (
        HttpSource(args.server, args.token) if args.server else DirSource(args.from_dir)
    )
    started = time.monotonic()
    result = pull(source, args.to, args.version)
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

    if (args.prompt is None) == (args.instruction is None):
        raise DaemonError("give either --instruction (and --input) or --prompt")
    if args.max_new_tokens < 1:
        raise DaemonError("--max-new-tokens must be at least 1")
    bundle = Bundle.open(args.bundle)
    print(
        bundle.generate(
            args.prompt,
            instruction=args.instruction,
            input=args.input,
            max_new_tokens=args.max_new_tokens,
        )
    )
    return 0
