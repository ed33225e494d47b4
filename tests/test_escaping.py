"""Input cannot forge a log line or drive the terminal: control characters are escaped.

A field name such as ``"x\\n2026-01-01 ERROR ...\\x1b[2J"`` used to start a second log line and
reach the terminal raw in ``aftertune dlq list``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import redis
from conftest import run_cli

from aftertune.daemon.logs import configure_logging
from aftertune.store.errors import RecordError
from aftertune.store.records import parse_record, printable

FORGED = "name\n2026-01-01 00:00:00,000 ERROR aftertune: forged\x1b[2J\x1b]0;title\x07"
# Past what json.dumps escapes: DEL, C1 CSI (a terminal's ESC [), line and paragraph
# separators, a right-to-left override.
UNUSUAL = "a\x7fb\x9b31mc\u2028d\u2029e\u202ef\x00"


def _assert_inert(text: str) -> None:
    """One line, nothing a terminal acts on."""
    assert "\n" not in text and "\r" not in text
    assert text.isprintable(), repr(text)


def test_printable_escapes_controls_and_keeps_text() -> None:
    assert printable("héllo 中文 ok") == "héllo 中文 ok"
    assert printable("a\nb\x1b[31m\t") == "a\\nb\\x1b[31m\\t"
    assert printable(UNUSUAL) == "a\\x7fb\\x9b31mc\\u2028d\\u2029e\\u202ef\\x00"
    _assert_inert(printable(FORGED + UNUSUAL))


def test_a_record_reason_naming_a_hostile_field_is_escaped() -> None:
    payload = json.dumps({"task": "t", "instruction": "i", "output": "o", FORGED: 1})
    with pytest.raises(RecordError) as info:
        parse_record(payload)
    _assert_inert(info.value.reason)
    assert "\\n2026-01-01" in info.value.reason and "\\x1b[2J" in info.value.reason


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    yield out
    root.handlers[:], level = saved
    root.setLevel(level)


def _log(out: io.StringIO, fmt: str, *args: object) -> list[str]:
    configure_logging("INFO", fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    logging.getLogger("aftertune.test").warning("dead-lettered (first: %s: %s)", *args)
    return out.getvalue().splitlines()


def test_a_text_log_line_cannot_be_forged(log_output: io.StringIO) -> None:
    lines = _log(log_output, "text", "1-0", FORGED + UNUSUAL)
    assert len(lines) == 1
    _assert_inert(lines[0])
    assert "forged\\x1b[2J" in lines[0]


def test_a_json_log_line_stays_one_inert_line_with_the_exact_message(
    log_output: io.StringIO,
) -> None:
    lines = _log(log_output, "json", "1-0", FORGED + UNUSUAL)
    assert len(lines) == 1
    _assert_inert(lines[0])
    assert json.loads(lines[0])["msg"] == f"dead-lettered (first: 1-0: {FORGED + UNUSUAL})"


def test_a_traceback_keeps_its_lines_but_no_control_characters(log_output: io.StringIO) -> None:
    configure_logging("INFO", "text")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(log_output)
    try:
        raise ValueError("bad \x1b[2J input")
    except ValueError:
        logging.getLogger("aftertune.test").exception("failed on %s", "x\ny")
    lines = log_output.getvalue().splitlines()
    assert lines[0].endswith("failed on x\\ny") and lines[1].startswith("Traceback")
    assert all(line.isprintable() for line in lines)


def test_dlq_list_and_push_print_hostile_text_inert(redis_url: str, tmp_path: object) -> None:
    env = {"AFTERTUNE_REDIS__URL": redis_url, "AFTERTUNE_STATE_DIR": str(tmp_path)}
    client = redis.Redis.from_url(redis_url)
    record = json.dumps({"task": "t", "instruction": "i", "output": "o", FORGED: 1})
    client.xadd("aftertune:feedback", {"record": record})
    client.xadd("aftertune:feedback", {FORGED: b"x"})  # no record field at all
    # A dead letter written by someone else straight onto the stream, reason and all.
    client.xadd(
        "aftertune:feedback:dead",
        {"entry_id": "9-" + FORGED, "reason": FORGED + UNUSUAL, "payload": FORGED.encode()},
    )
    done = run_cli("serve", "--burst", env=env)
    assert done.returncode == 0, done.stderr
    assert all(line.isprintable() for line in done.stderr.splitlines()), done.stderr
    listed = run_cli("dlq", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[-1] == "3 dead letters"
    assert len(lines) == 3 * 2 + 1  # two lines per dead letter, and the count
    assert all(line.isprintable() for line in lines), listed.stdout
    as_json = json.loads(run_cli("dlq", "list", "--json", env=env).stdout)
    written = [d for d in as_json if d["entry_id"] == "9-" + FORGED]
    assert written[0]["reason"] == FORGED + UNUSUAL  # --json keeps the exact text
    bad = tmp_path / "bad.jsonl"  # type: ignore[operator]
    bad.write_text(record + "\n")
    pushed = run_cli("push", "--validate", str(bad), env=env)
    assert pushed.returncode == 1
    assert all(line.isprintable() for line in pushed.stderr.splitlines()), pushed.stderr
    assert "line 1: field 'name\\n2026" in pushed.stderr
