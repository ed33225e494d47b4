"""Progress of long phases: a bar on a terminal, structured log events elsewhere, never a bar
inside a JSON log."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from aftertune.daemon.logs import JsonLines, configure_logging
from aftertune.store import progress
from aftertune.store.progress import Progress, bars_wanted, ticking


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The root logger writing JSON lines to a buffer; events from the first update on."""
    monkeypatch.setattr(progress, "FIRST_EVENT_S", 0.0)
    monkeypatch.setattr(progress, "EVENT_EVERY_S", 0.0)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    yield buffer
    root.handlers[:], root.level = saved


def test_events_carry_the_figures_as_json_fields(json_log: io.StringIO) -> None:
    with Progress("pull v3", total=3000, unit="B") as bar:
        for _ in range(3):
            bar.update(1000)
    events = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert [e["state"] for e in events] == ["running", "running", "running", "done"]
    last = events[-1]
    assert last["phase"] == "pull v3" and last["done"] == 3000 and last["total"] == 3000
    assert last["unit"] == "B" and last["rate"] > 0 and "3.0 kB of 3.0 kB" in last["msg"]
    assert events[0]["eta_s"] is not None and last["eta_s"] is None


def test_counted_units_read_as_words(json_log: io.StringIO) -> None:
    for _ in Progress("evaluate 3 tasks", 3, "task").track(["a", "b", "c"]):
        pass
    messages = [json.loads(line)["msg"] for line in json_log.getvalue().splitlines()]
    assert "evaluate 3 tasks: running, 1 of 3 tasks (33%)" in messages[0]
    assert "evaluate 3 tasks: done, 3 of 3 tasks (100%)" in messages[-1]
    assert "tasks/s" in messages[-1]


def test_a_unit_ending_in_ch_takes_es(json_log: io.StringIO) -> None:
    for _ in Progress("Fisher", 3, "batch").track(range(3)):
        pass
    messages = [json.loads(line)["msg"] for line in json_log.getvalue().splitlines()]
    assert "Fisher: done, 3 of 3 batches (100%)" in messages[-1]
    assert "batches/s" in messages[-1] and "batchs" not in json_log.getvalue()


def test_a_short_phase_stays_silent_and_a_disabled_one_says_nothing(
    json_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "FIRST_EVENT_S", 60.0)
    assert list(Progress("evaluate", 2, "task").track(["a", "b"])) == ["a", "b"]
    monkeypatch.setattr(progress, "FIRST_EVENT_S", 0.0)
    with Progress("train adapter", 5, "step", enabled=False) as bar:
        bar.update(5)
    assert json_log.getvalue() == ""


def test_a_step_with_nothing_to_count_reports_seconds(json_log: io.StringIO) -> None:
    with ticking("export v1"):
        time.sleep(1.3)
    events = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert events and events[-1]["state"] == "done" and events[-1]["unit"] == "s"


def test_no_bar_when_the_log_is_json_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    configure_logging("INFO", "text")
    assert bars_wanted()
    configure_logging("INFO", "json")
    assert not bars_wanted()
    logging.getLogger().handlers[:] = []
