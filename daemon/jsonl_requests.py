"""The requests ``aftertune generate --jsonl`` answers: a JSONL file (or stdin) read one line
at a time, so memory stays bounded whatever the file's size.

Each non-blank line becomes a ``Request`` or a ``BadLine`` whose message names the line and
what is wrong with it (not UTF-8, not JSON, nested too deeply, a lone surrogate, a field of
the wrong type, longer than ``MAX_LINE_BYTES``); reading goes on with the next line. A line
past the limit is skipped in chunks, never held whole.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aftertune.daemon.errors import DaemonError

MAX_LINE_BYTES = 4 << 20  # one request; a bundle's context is a few thousand tokens at most
_SKIP_CHUNK = 1 << 20
FIELDS = ("instruction", "input", "task", "id")


@dataclass(frozen=True)
class Request:
    line: int
    task: str | None
    instruction: str
    input: str
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True)
class BadLine:
    line: int
    error: str  # names the line and what is wrong


def read_requests(path: Path) -> Iterator[Request | BadLine]:
    """Every non-blank line of ``path`` ('-': stdin), in order, as a request or a bad line."""
    if str(path) == "-":
        yield from _lines(sys.stdin.buffer, "stdin")
        return
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the last line
    except OSError as exc:
        raise DaemonError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        yield from _lines(fh, str(path))


def _lines(fh: IO[bytes], where: str) -> Iterator[Request | BadLine]:
    number = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            skipped = len(raw) + _skip_rest(fh)
            yield BadLine(
                number,
                f"{where}:{number}: {skipped} bytes, more than the {MAX_LINE_BYTES} a request "
                "may hold; nothing past a bundle's context is read anyway: shorten the input",
            )
            continue
        if raw.strip():
            yield parse_request(raw, number, where)


def _skip_rest(fh: IO[bytes]) -> int:
    """Read past the rest of an overlong line, a chunk at a time; the bytes skipped."""
    skipped = 0
    while True:
        chunk = fh.readline(_SKIP_CHUNK)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def parse_request(raw: bytes, number: int, where: str) -> Request | BadLine:
    """One line's request, or what is wrong with it."""
    at = f"{where}:{number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadLine(number, f"{at}: not UTF-8 (byte 0x{raw[exc.start]:02x} at {exc.start})")
    try:
        record = json.loads(text)
    except RecursionError:
        return BadLine(number, f"{at}: JSON nested too deeply to read")
    except ValueError as exc:
        return BadLine(number, f"{at}: not JSON: {exc}")
    if not isinstance(record, dict):
        return BadLine(number, f"{at}: a record is a JSON object")
    for key in FIELDS[:3]:
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            return BadLine(number, f"{at}: {key!r} must be a string")
        if not _encodable(value):
            return BadLine(
                number, f"{at}: {key!r} holds a lone surrogate (an unpaired \\ud800-\\udfff)"
            )
    if isinstance(record.get("id"), str) and not _encodable(record["id"]):
        return BadLine(number, f"{at}: 'id' holds a lone surrogate (an unpaired \\ud800-\\udfff)")
    instruction = record.get("instruction") or ""
    if not instruction.strip():
        return BadLine(number, f"{at}: 'instruction' is missing or empty")
    return Request(
        number,
        record.get("task"),
        instruction,
        record.get("input") or "",
        record.get("id"),
        "id" in record,
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
