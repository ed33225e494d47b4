"""`aftertune generate --jsonl` streams: one line in, one answer out, and every malformed line
is an error naming it, never a traceback (issue 25 item 7). A real exported tiny bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from consumer_fixtures import export_published_state

from aftertune.daemon.jsonl_requests import MAX_LINE_BYTES
from aftertune.store.consumer import Bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = export_published_state(tmp_path_factory.mktemp("state"))
    return state / "bundles" / "v1"


def _command(bundle: Path) -> list[str]:
    cli = [sys.executable, "-m", "aftertune.daemon.cli"]
    return [*cli, "generate", "--bundle", str(bundle), "--jsonl", "-"]


def test_every_malformed_line_is_named_and_the_others_answered(bundle: Path) -> None:
    good = {"id": "q1", "instruction": "Reverse the word", "input": "abc"}
    lines = [
        json.dumps(good).encode(),
        b"[" * 200_000,  # RecursionError in the JSON parser
        b'{"instruction": "say \\ud800"}',  # a lone surrogate
        b'{"instruction": "caf\xe9"}',  # Latin-1, not UTF-8
        json.dumps({"instruction": "x" * (20 << 20)}).encode(),  # a 20 MB prompt
        json.dumps({"instruction": "Repeat", "input": "y" * (2 << 20)}).encode(),  # past context
        b"",  # blank: skipped
        b"[1, 2]",
        json.dumps({"instruction": "Reverse the word", "input": "xyz"}).encode(),
    ]
    done = subprocess.run(
        _command(bundle),
        input=b"\n".join(lines),  # bytes: line 4 is not UTF-8
        capture_output=True,
        timeout=300,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in stderr, stderr
    out = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [o.get("line") for o in out] == [None, 2, 3, 4, 5, 6, 8, None]
    errors = {o["line"]: o["error"] for o in out if "error" in o}
    assert "stdin:2: JSON nested too deeply" in errors[2]
    assert "stdin:3: 'instruction' holds a lone surrogate" in errors[3]
    assert "stdin:4: not UTF-8 (byte 0xe9" in errors[4]
    assert f"more than the {MAX_LINE_BYTES} a request may hold" in errors[5]
    assert "line 6: the prompt is" in errors[6] and "shorten the instruction or input" in errors[6]
    assert "stdin:8: a record is a JSON object" in errors[8]
    for error in errors.values():
        assert error in stderr
    opened = Bundle.open(bundle)
    assert out[0] == {
        "task": None,
        "answer": opened.answer(None, good["instruction"], good["input"]),
        "id": "q1",
    }
    assert out[-1]["answer"] == opened.answer(None, "Reverse the word", "xyz")


def test_answers_stream_out_as_lines_come_in(bundle: Path) -> None:
    """Each answer is printed before the next line is written: nothing waits for the end."""
    proc = subprocess.Popen(
        _command(bundle),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for word in ("abc", "def", "ghi"):
            line = json.dumps({"id": word, "instruction": "Reverse the word", "input": word})
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())  # would block for ever if batched
            assert answer["id"] == word and isinstance(answer["answer"], str)
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
