"""The feedback record: the wire format producers write and the unit the store keeps.

One stream entry carries one field ``record`` holding a JSON object (see
docs/wire-format.md). ``parse_record`` turns raw bytes into a validated :class:`Record` or raises
:class:`~aftertune.store.errors.RecordError` naming the field and what was wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from enum import Enum
from typing import Any, NamedTuple

import msgspec
import orjson

from aftertune.store.errors import RecordError

DEFAULT_MAX_RECORD_BYTES = 64 * 1024
TEST_SHARE_PERCENT = 10  # share of each task that `split: auto` sends to the held-out set
MAX_META_DEPTH = 8
MAX_ID_CHARS = 256
MAX_TASK_CHARS = 128
# A weight scales an example's share of the loss. Above this, one record can outweigh a
# whole batch, and float32 (the loss) overflows long before float64 (JSON) does: 1e308 is
# finite here and inf in training, where it turns the loss into NaN.
MAX_WEIGHT = 1000.0
_WHITESPACE = re.compile(r"\s")


class Split(str, Enum):
    AUTO = "auto"
    TRAIN = "train"
    TEST = "test"


class Record(NamedTuple):
    """A validated feedback record. ``split`` is always resolved to train or test.

    A NamedTuple, not a dataclass: ingest builds one per entry and tuples build fastest.
    """

    id: str
    task: str
    instruction: str
    input: str
    output: str
    split: Split
    pinned: bool = False  # True when the producer chose the split (golden records)
    weight: float = 1.0
    source: str = ""
    meta: dict[str, Any] = {}  # noqa: RUF012 - never mutated; records are read-only


# The wire format: field -> (required, accepted types). This is the validator that names
# the problem; ingest first tries the msgspec fast path below and comes here only for a
# record that path refuses, so every refusal reads the same whichever path saw it first.
WIRE_FIELDS: dict[str, tuple[bool, tuple[type, ...]]] = {
    "id": (False, (str, type(None))),
    "task": (True, (str,)),
    "instruction": (True, (str,)),
    "input": (False, (str,)),
    "output": (True, (str,)),
    "split": (False, (str,)),
    "weight": (False, (int, float)),
    "source": (False, (str,)),
    "meta": (False, (dict,)),
    # Feedback on a served answer (the answer server sends them; docs/wire-format.md).
    "answer_id": (False, (str,)),
    "served_version": (False, (int,)),
    "served_answer": (False, (str,)),
    "rating": (False, (str,)),
}
# Where a record's feedback fields are kept: under this key of its stored ``meta``, so the
# store's columns stay as they are; a producer's own meta may not use the key.
FEEDBACK_META = "aftertune"
SERVED_FIELDS = ("answer_id", "served_version", "served_answer", "rating")
RATINGS = ("up", "down")
_TYPE_NAMES = {str: "a string", dict: "a JSON object", int: "a number", float: "a number"}


class _Wire(msgspec.Struct, forbid_unknown_fields=True):
    """The wire format as msgspec decodes it: JSON, field names and types checked in C."""

    task: str
    instruction: str
    output: str
    input: str = ""
    id: str | None = None
    split: str = "auto"
    weight: float = 1.0
    source: str = ""
    meta: dict[str, Any] = {}
    answer_id: str | None = None
    served_version: int | None = None
    served_answer: str | None = None
    rating: str | None = None


_WIRE = msgspec.json.Decoder(_Wire)
_TEXT_FIELDS = ("id", "instruction", "input", "output", "source", "answer_id", "served_answer")
_SPLITS = frozenset(s.value for s in Split)
CONFUSABLE_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "GREEK"})  # letters that look alike


def _check_types(obj: dict[str, Any]) -> None:
    for key in obj:
        if key not in WIRE_FIELDS:
            raise RecordError(f"field '{printable(key)}' is not part of the wire format")
    for name, (required, types) in WIRE_FIELDS.items():
        if name not in obj:
            if required:
                raise RecordError(f"field '{name}' is missing")
            continue
        value = obj[name]
        if not isinstance(value, types) or isinstance(value, bool):
            want = "an integer" if types == (int,) else _TYPE_NAMES[types[0]]
            raise RecordError(f"field '{name}' must be {want}, got {_json_type(value)}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "an array"}.get(
        type(value), "an object"
    )


def _mixed_scripts(task: str) -> str | None:
    """Why ``task`` could pass for another task: letters from more than one of the Latin,
    Cyrillic and Greek scripts ('parity' with a Cyrillic 'а' looks like 'parity'); else None.
    Other scripts mix legitimately (Japanese: kanji and kana) and are not checked."""
    seen: dict[str, str] = {}
    for ch in task:
        script = unicodedata.name(ch, "").split(" ", 1)[0] if ch.isalpha() else ""
        if script in CONFUSABLE_SCRIPTS:
            seen.setdefault(script, ch)
    if len(seen) < 2:
        return None
    shown = ", ".join(f"{s.title()} {c!r} (U+{ord(c):04X})" for s, c in sorted(seen.items()))
    return (
        f"field 'task' mixes scripts ({shown}), so it looks like a task it is not; "
        "write a task name in one script"
    )


def _check_values(obj: dict[str, Any]) -> None:
    for name in ("task", "instruction", "output"):
        if not obj[name].strip():
            raise RecordError(f"field '{name}' must not be empty or whitespace only")
    for name in _TEXT_FIELDS:
        if "\x00" in (obj.get(name) or ""):
            # PostgreSQL's text cannot hold it, and no prompt needs it.
            raise RecordError(f"field '{name}' must not contain the NUL character (\\u0000)")
    task = obj["task"]
    if len(task) > MAX_TASK_CHARS:
        raise RecordError(f"field 'task' must be at most {MAX_TASK_CHARS} characters")
    if not task.isprintable() or _WHITESPACE.search(task):
        raise RecordError("field 'task' must not contain whitespace or control characters")
    mixed = _mixed_scripts(task)
    if mixed:
        raise RecordError(mixed)
    record_id = obj.get("id")
    if record_id is not None and (not record_id.strip() or len(record_id) > MAX_ID_CHARS):
        raise RecordError(
            f"field 'id' must be a non-empty string of at most {MAX_ID_CHARS} characters"
        )
    if obj.get("split", "auto") not in Split._value2member_map_:
        raise RecordError("field 'split' must be one of auto, train, test")
    weight = _as_float(obj.get("weight", 1.0))
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise RecordError(
            f"field 'weight' must be a number greater than 0 and at most {MAX_WEIGHT:g},"
            f" got {weight:g}"
        )
    if obj.get("meta") and _depth(obj["meta"]) > MAX_META_DEPTH:
        raise RecordError(f"field 'meta' must nest at most {MAX_META_DEPTH} levels deep")
    _check_served(obj)


def _check_served(obj: dict[str, Any]) -> None:
    """The feedback fields: a rating is up or down, a thumbs-down never a held-out record."""
    if FEEDBACK_META in (obj.get("meta") or {}):
        raise RecordError(
            f"meta key '{FEEDBACK_META}' is reserved for what was served: send answer_id, "
            "served_version, served_answer and rating as top-level fields"
        )
    rating = obj.get("rating")
    if rating is not None and rating not in RATINGS:
        raise RecordError('field \'rating\' must be "up" or "down"')
    if rating == "down" and obj.get("split") == "test":
        raise RecordError(
            "a record rated down (its output is a wrong answer) cannot be split 'test': "
            "a held-out record is a right answer; leave split out or send 'train'"
        )
    version = obj.get("served_version")
    if version is not None and version < 1:
        raise RecordError(f"field 'served_version' must be a version (1 or more), got {version}")
    answer_id = obj.get("answer_id")
    if answer_id is not None and (not answer_id.strip() or len(answer_id) > MAX_ID_CHARS):
        raise RecordError(
            f"field 'answer_id' must be a non-empty string of at most {MAX_ID_CHARS} characters"
        )


def _as_float(number: float) -> float:
    """A JSON number as a float; an integer too large for one is infinite."""
    try:
        return float(number)
    except OverflowError:
        return math.inf


def _depth(value: object, level: int = 1) -> int:
    if level > MAX_META_DEPTH + 1:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _check_utf8(obj: dict[str, Any]) -> None:
    """JSON escapes can smuggle lone surrogates, which no UTF-8 store can hold."""
    for value in obj.values():
        if isinstance(value, str):
            value.encode("utf-8")
        elif value:
            json.dumps(value, ensure_ascii=False).encode("utf-8")


def printable(text: str) -> str:
    """``text`` with every control or invisible character written as an escape (``\\n``,
    ``\\x1b``, ``\\u202e``): one line, nothing a terminal acts on.

    The one helper for messages built from input: dead-letter reasons, log lines, CLI output.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def content_id(
    task: str, instruction: str, input: str, output: str, rating: str | None = None
) -> str:
    """sha256 (hex) of the compact UTF-8 JSON array ``[task, instruction, input, output]``,
    with the rating appended when there is one (so an up and a down on one answer are two
    records, and an unrated record keeps the id it always had)."""
    fields = [task, instruction, input, output] + ([rating] if rating is not None else [])
    return hashlib.sha256(orjson.dumps(fields)).hexdigest()


def served_meta(meta: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the feedback fields present in ``fields`` under ``FEEDBACK_META``."""
    served = {name: fields[name] for name in SERVED_FIELDS if fields.get(name) is not None}
    return {**meta, FEEDBACK_META: served} if served else meta


def rating_of(meta: dict[str, Any]) -> str | None:
    """The rating (up/down) a stored record's meta carries, if any."""
    served = meta.get(FEEDBACK_META)
    return served.get("rating") if isinstance(served, dict) else None


def auto_split(record_id: str) -> Split:
    """Stable split for ``split: auto``: ~TEST_SHARE_PERCENT % of ids go to test."""
    digest = hashlib.sha256(f"aftertune-split:{record_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return Split.TEST if bucket < TEST_SHARE_PERCENT else Split.TRAIN


def _auto(record_id: str, rating: str | None) -> Split:
    """``split: auto``: a thumbs-down (a wrong answer) always trains, never is held out."""
    return Split.TRAIN if rating == "down" else auto_split(record_id)


def record_from_obj(obj: object) -> Record:
    """Validate a decoded JSON value as a record; raise RecordError on the first problem."""
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {_json_type(obj)}")
    try:
        _check_utf8(obj)
    except UnicodeEncodeError:
        raise RecordError(
            "record contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)"
        ) from None
    return _validated(obj)


def _validated(obj: dict[str, Any]) -> Record:
    """The record for an object known to hold only valid UTF-8 strings."""
    _check_types(obj)
    # One spelling per task name: "é" precomposed or as e + U+0301 is the same task.
    obj["task"] = unicodedata.normalize("NFC", obj["task"])
    _check_values(obj)
    task, instruction, input, output = (
        obj["task"],
        obj["instruction"],
        obj.get("input", ""),
        obj["output"],
    )
    record_id = obj.get("id") or content_id(task, instruction, input, output, obj.get("rating"))
    requested = Split(obj.get("split", "auto"))
    pinned = requested is not Split.AUTO
    return Record(
        id=record_id,
        task=task,
        instruction=instruction,
        input=input,
        output=output,
        split=requested if pinned else _auto(record_id, obj.get("rating")),
        pinned=pinned,
        weight=float(obj.get("weight", 1.0)),
        source=obj.get("source", ""),
        meta=served_meta(obj.get("meta", {}), obj),
    )


def parse_record(payload: bytes | str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Record:
    """Parse one wire payload (UTF-8 JSON) into a Record, or raise RecordError saying why.

    Measured on ingest's bench record: the msgspec path takes ~4 µs, the dict path that
    names problems ~15 µs; a record the fast path doubts takes the named path, so a
    refusal's message does not depend on which path saw it.
    """
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if len(raw) > max_bytes:
        raise RecordError(f"record is {len(raw)} bytes; the limit is {max_bytes} bytes")
    if b"\\u0000" in raw:  # a NUL in a text field: the named path says which
        return _parse_named(raw)
    try:
        wire = _WIRE.decode(raw)
    except (msgspec.MsgspecError, RecursionError):
        return _parse_named(raw)
    if not _plainly_valid(wire):
        return _parse_named(raw)
    record_id = wire.id or content_id(
        wire.task, wire.instruction, wire.input, wire.output, wire.rating
    )
    requested = wire.split
    return Record(
        record_id,
        wire.task,
        wire.instruction,
        wire.input,
        wire.output,
        _auto(record_id, wire.rating) if requested == "auto" else Split(requested),
        requested != "auto",
        wire.weight,
        wire.source,
        served_meta(wire.meta, _served_fields(wire)),
    )


def _served_fields(wire: _Wire) -> dict[str, Any]:
    return {name: getattr(wire, name) for name in SERVED_FIELDS}


def _plainly_valid(wire: _Wire) -> bool:
    """The value checks of ``_check_values`` as one test, for the fast path; False sends the
    record to the path that names its problem."""
    task, record_id = wire.task, wire.id
    return bool(
        task.isascii()  # other names are normalized and checked for mixed scripts there
        and task.strip()
        and wire.instruction.strip()
        and wire.output.strip()
        and len(task) <= MAX_TASK_CHARS
        and task.isprintable()
        and not _WHITESPACE.search(task)
        and (record_id is None or (record_id.strip() and len(record_id) <= MAX_ID_CHARS))
        and wire.split in _SPLITS
        and 0 < wire.weight <= MAX_WEIGHT
        and (not wire.meta or _depth(wire.meta) <= MAX_META_DEPTH)
        and FEEDBACK_META not in wire.meta
        and (wire.rating is None or wire.rating in RATINGS)
        and not (wire.rating == "down" and wire.split == "test")
        and (wire.served_version is None or wire.served_version >= 1)
        and (
            wire.answer_id is None
            or (wire.answer_id.strip() and len(wire.answer_id) <= MAX_ID_CHARS)
        )
    )


def _parse_named(raw: bytes) -> Record:
    """The slow path: decode with orjson and validate field by field, naming the problem."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError(_json_problem(raw, exc)) from None
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {_json_type(obj)}")
    return _validated(obj)  # orjson has already refused invalid UTF-8 and lone surrogates


def _json_problem(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"record is not valid UTF-8 (byte {bad.start})"
    if "surrogate" in exc.msg:
        return "record contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)"
    if "depth limit" in exc.msg:
        return "record JSON nests too deeply"
    return f"record is not valid JSON: {exc.msg} at char {exc.pos}"
