"""The feedback record: the wire format producers write and the unit the store keeps.

One stream entry carries one field ``record`` holding a JSON object (see README, "Wire
format"). ``parse_record`` turns raw bytes into a validated :class:`Record` or raises
:class:`~aftertune.store.errors.RecordError` naming the field and what was wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import math
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aftertune.store.errors import RecordError

DEFAULT_MAX_RECORD_BYTES = 64 * 1024
TEST_SHARE_PERCENT = 10  # share of each task that `split: auto` sends to the held-out set
MAX_META_DEPTH = 8
MAX_ID_CHARS = 256
MAX_TASK_CHARS = 128


class Split(str, Enum):
    AUTO = "auto"
    TRAIN = "train"
    TEST = "test"


class Record(BaseModel):
    """A validated feedback record. ``split`` is always resolved to train or test."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str
    task: str
    instruction: str
    input: str = ""
    output: str
    split: Split
    pinned: bool = False  # True when the producer chose the split (golden records)
    weight: float = 1.0
    source: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, sort_keys=True)


class _Wire(BaseModel):
    """What a producer may send; validated strictly (no coercion of numbers to strings)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = None
    task: str
    instruction: str
    input: str = ""
    output: str
    split: Split = Split.AUTO
    weight: float = 1.0
    source: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task", "instruction", "output")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or whitespace only")
        return value

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if len(value) > MAX_TASK_CHARS:
            raise ValueError(f"must be at most {MAX_TASK_CHARS} characters")
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ValueError("must not contain whitespace or control characters")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip() or len(value) > MAX_ID_CHARS:
            raise ValueError(f"must be a non-empty string of at most {MAX_ID_CHARS} characters")
        return value

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, Split):
            return value
        if isinstance(value, str) and value in Split._value2member_map_:
            return Split(value)
        raise ValueError("must be one of auto, train, test")

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be a finite number greater than 0")
        return float(value)

    @field_validator("meta")
    @classmethod
    def _meta(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _depth(value) > MAX_META_DEPTH:
            raise ValueError(f"must nest at most {MAX_META_DEPTH} levels deep")
        return value


def _depth(value: object, level: int = 1) -> int:
    if level > MAX_META_DEPTH + 1:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def content_id(task: str, instruction: str, input: str, output: str) -> str:
    """sha256 of the canonical JSON of (task, instruction, input, output)."""
    canonical = json.dumps(
        {"input": input, "instruction": instruction, "output": output, "task": task},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def auto_split(record_id: str) -> Split:
    """Stable split for ``split: auto``: ~TEST_SHARE_PERCENT % of ids go to test."""
    digest = hashlib.sha256(f"aftertune-split:{record_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return Split.TEST if bucket < TEST_SHARE_PERCENT else Split.TRAIN


def record_from_obj(obj: object) -> Record:
    """Validate a decoded JSON value as a record; raise RecordError on the first problem."""
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {type(obj).__name__}")
    try:
        wire = _Wire.model_validate(obj)
    except ValidationError as exc:
        raise RecordError(_describe(exc)) from None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(
            "record contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)"
        ) from None
    record_id = wire.id or content_id(wire.task, wire.instruction, wire.input, wire.output)
    pinned = wire.split is not Split.AUTO
    split = wire.split if pinned else auto_split(record_id)
    return Record(
        id=record_id,
        task=wire.task,
        instruction=wire.instruction,
        input=wire.input,
        output=wire.output,
        split=split,
        pinned=pinned,
        weight=wire.weight,
        source=wire.source,
        meta=wire.meta,
    )


def parse_record(payload: bytes | str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Record:
    """Parse one wire payload (UTF-8 JSON) into a Record, or raise RecordError saying why."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if len(raw) > max_bytes:
        raise RecordError(f"record is {len(raw)} bytes; the limit is {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"record is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise RecordError("record JSON nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"record is not valid JSON: {exc.msg} at char {exc.pos}") from None
    return record_from_obj(obj)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "record"
        kind = err["type"]
        if kind == "missing":
            parts.append(f"field '{field}' is missing")
        elif kind == "extra_forbidden":
            parts.append(f"field '{field}' is not part of the wire format")
        elif kind == "enum":
            parts.append(f"field '{field}' must be one of auto, train, test")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"field '{field}': {msg}")
    return "; ".join(parts)
