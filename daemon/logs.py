"""Logging setup: one event per line, as text or JSON lines (``--log-format json``).

Messages carry input (field names, reasons, paths): either format escapes its control
characters, so no input can start a forged line or reach the terminal as an escape sequence.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
import warnings
from typing import Any, TextIO

from aftertune.store.records import printable


class TextLines(logging.Formatter):
    """``time LEVEL logger: message``, the message escaped to one inert line.

    A traceback keeps its own line breaks; its lines are escaped one by one.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        escaped = copy.copy(record)  # other handlers see the record as it was
        escaped.message = printable(record.message)
        return super().formatMessage(escaped)

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return _printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _printable_lines(super().formatStack(stack_info))


def _printable_lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.split("\n"))


class JsonLines(logging.Formatter):
    """One JSON object per event: ts, level, logger, msg, and the event's own figures.

    A call that passes ``extra={"fields": {...}}`` (progress, ingest batches, promotions)
    gets those as keys of the object, values kept as JSON numbers, strings or lists, so a
    reader never parses them back out of ``msg``.
    """

    emits_json = True  # store/progress.py: no tqdm bar while this formats the log

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            event.update({k: v for k, v in fields.items() if k not in event})
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return _json_line(event)


def _json_line(event: dict[str, Any]) -> str:
    """``event`` as one JSON line with no control or invisible character left raw.

    json.dumps escapes U+0000-U+001F only; DEL, C1 controls (U+009B acts as ESC [), U+2028
    and the like get their JSON escape here, so the decoded value stays exactly the same.
    """
    line = json.dumps(event, ensure_ascii=False, default=str)
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in line)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else TextLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler logs every job run at INFO (every few seconds here): keep its warnings only.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # uvicorn's "Started server process" repeats what server.py says once.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    warnings.showwarning = warning_as_debug


def warning_as_debug(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A library's warning (torch.onnx's TracerWarning while it traces an encoder, a
    deprecation) as a DEBUG event of the ``py.warnings`` logger: it tells a developer where
    to look, not an operator what to do, and a raw two-line warning on stderr would break a
    JSON log. Python's warning filters still decide which warnings get here, and how often."""
    logging.getLogger("py.warnings").debug(
        "%s: %s (%s:%d)", category.__name__, message, filename, lineno
    )
