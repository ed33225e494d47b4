from __future__ import annotations

import json

import pytest

from aftertune.store.errors import RecordError
from aftertune.store.records import Split, content_id, parse_record, record_from_obj

VALID = {"task": "sentiment", "instruction": "Classify.", "input": "great film", "output": "POS"}


def _parse(obj: object) -> object:
    return parse_record(json.dumps(obj).encode())


def test_valid_record_gets_content_id_and_auto_split() -> None:
    record = parse_record(json.dumps(VALID).encode())
    assert record.id == content_id("sentiment", "Classify.", "great film", "POS")
    assert record.split in (Split.TRAIN, Split.TEST)
    assert record.pinned is False
    again = parse_record(json.dumps(dict(reversed(list(VALID.items())))).encode())
    assert again.id == record.id and again.split == record.split


def test_producer_id_and_pinned_split_are_kept() -> None:
    record = _parse({**VALID, "id": "golden-1", "split": "test", "weight": 2, "meta": {"a": [1]}})
    assert record.id == "golden-1"
    assert record.split is Split.TEST and record.pinned
    assert record.weight == 2.0 and record.meta == {"a": [1]}


def test_auto_split_sends_about_ten_percent_to_test() -> None:
    splits = [_parse({**VALID, "input": f"x{i}"}).split for i in range(5000)]
    share = splits.count(Split.TEST) / len(splits)
    assert 0.08 < share < 0.12


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (
            json.dumps({k: v for k, v in VALID.items() if k != "output"}).encode(),
            "'output' is missing",
        ),
        (json.dumps({**VALID, "instruction": "  "}).encode(), "'instruction' must not be empty"),
        (json.dumps({**VALID, "task": 7}).encode(), "'task'"),
        (json.dumps({**VALID, "input": None}).encode(), "'input'"),
        (json.dumps({**VALID, "split": "dev"}).encode(), "must be one of auto, train, test"),
        (json.dumps({**VALID, "weight": -1}).encode(), "'weight'"),
        (json.dumps({**VALID, "weight": "1"}).encode(), "'weight' must be a number, got a string"),
        (json.dumps({**VALID, "task": "two words"}).encode(), "whitespace"),
        (
            json.dumps({**VALID, "colour": "red"}).encode(),
            "'colour' is not part of the wire format",
        ),
        (
            json.dumps(
                {**VALID, "meta": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}}
            ).encode(),
            "nest",
        ),
        (b'{"task": "t", "instruction": "\\ud800", "output": "o"}', "surrogate"),
        (b"[" * 50_000 + b"]" * 50_000, "limit"),
    ],
)
def test_invalid_records_name_the_problem(payload: bytes, fragment: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_record(payload, max_bytes=64 * 1024)
    assert fragment in info.value.reason


def test_oversize_record_is_rejected_before_parsing() -> None:
    big = json.dumps({**VALID, "input": "x" * 70_000}).encode()
    with pytest.raises(RecordError, match="the limit is 65536 bytes"):
        parse_record(big)
    assert parse_record(big, max_bytes=len(big)).input == "x" * 70_000


def test_deep_nesting_within_size_limit_is_rejected_not_crashing() -> None:
    with pytest.raises(RecordError, match="nests too deeply"):
        parse_record(b"[" * 30_000 + b"]" * 30_000, max_bytes=10**6)


@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (1e308, "1e+308"),
        (1000.5, "1000.5"),
        pytest.param(10**400, "inf", id="10**400"),
        (0, "0"),
        (-1, "-1"),
    ],
)
def test_weight_is_bounded_to_a_documented_range(weight: float, shown: str) -> None:
    """1e308 is finite in float64 and inf in float32: it used to reach training, where one
    record turned a batch's loss into NaN and got the clean records around it quarantined."""
    with pytest.raises(RecordError) as caught:
        record_from_obj({**VALID, "weight": weight})
    assert str(caught.value) == (
        f"field 'weight' must be a number greater than 0 and at most 1000, got {shown}"
    )


def test_weight_at_the_bound_is_accepted() -> None:
    assert record_from_obj({**VALID, "weight": 1000}).weight == 1000.0
    assert record_from_obj({**VALID, "weight": 1e-6}).weight == 1e-6


_EDGE_PAYLOADS = [
    json.dumps(VALID).encode(),
    json.dumps({**VALID, "id": "", "split": "train"}).encode(),
    json.dumps({**VALID, "id": None}).encode(),
    json.dumps({**VALID, "weight": True}).encode(),
    json.dumps({**VALID, "weight": 0}).encode(),
    json.dumps({**VALID, "weight": -0.0}).encode(),
    json.dumps({**VALID, "weight": 1000}).encode(),
    json.dumps({**VALID, "task": "x" * 129}).encode(),
    json.dumps({**VALID, "task": "a\u200bb"}).encode(),
    json.dumps({**VALID, "task": "a\u00a0b"}).encode(),
    json.dumps({**VALID, "input": "a\u0000b", "meta": {"k": [1, {"x": None}]}}).encode(),
    json.dumps({**VALID, "meta": []}).encode(),
    json.dumps({**VALID, "source": 3}).encode(),
    b'{"task": "t", "task": "u", "instruction": "i", "output": "o"}',
    b'{"task": "t", "instruction": "i", "output": "o", "weight": 1e400}',
    b'{"task": "t", "instruction": "i", "output": "o", "meta": {"a": 1e400}}',
    b'\xef\xbb\xbf{"task": "t", "instruction": "i", "output": "o"}',
    b'{"task": "\xff", "instruction": "i", "output": "o"}',
    b'{"task": "t", "instruction": "i", "output": "o", "meta": {"\\ud800": 1}}',
    b'{"task": "t", "instruction": "i", "output": "o", "meta": ' + b"[" * 9 + b"]" * 9 + b"}",
    b'{"task": "t", "instruction": "i", "output": "o", "meta": {"a": '
    + b"[" * 3000
    + b"]" * 3000
    + b"}}",
]


@pytest.mark.parametrize("payload", _EDGE_PAYLOADS)
def test_the_fast_path_accepts_and_refuses_exactly_what_the_named_path_does(
    payload: bytes,
) -> None:
    """parse_record tries msgspec first; a record must read the same whichever path took it."""
    from aftertune.store.records import _parse_named

    def outcome(parse: object) -> object:
        try:
            return parse(payload)  # type: ignore[operator]
        except RecordError as exc:
            return exc.reason

    assert outcome(lambda p: parse_record(p, max_bytes=10**6)) == outcome(_parse_named)


def test_a_nul_character_in_a_text_field_is_refused_on_every_backend() -> None:
    """PostgreSQL's text cannot hold U+0000: the record is dead-lettered, whatever the store."""
    with pytest.raises(RecordError, match=r"field 'input' must not contain the NUL character"):
        parse_record(json.dumps({**VALID, "input": "a\u0000b"}).encode())
    assert parse_record(json.dumps({**VALID, "meta": {"k": "a\u0000b"}}).encode()).meta
