"""Plain-text tables for the CLI: a header row, aligned columns, a unit on every number.

Light (no torch, no rich): ``status`` and ``models`` print these in well under a second.
Cells arrive as text already carrying their unit ("53.0 %", "0.693 nats/token", "12 s");
a column whose every cell reads as a number is right-aligned so digits line up.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from aftertune.store.records import printable

# A number, perhaps with a unit: right-aligned. A date or a name that starts with a digit is not.
_NUMERIC = re.compile(r"^[-+]?\d[\d,]*(\.\d+)?( ?(%|pp|s|B|kB|MB|GB|nats/token|examples))?$")


def when(at: float | None) -> str:
    """A moment as the CLI and the HTML report print it: UTC to the minute, saying so (the
    same on every machine a daemon and its operator's terminal may sit on)."""
    return "—" if at is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: int = 0) -> str:
    """``rows`` under ``headers``, two spaces between columns; cells are escaped to one line."""
    cells = [[printable(str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right = [
        bool(cells) and all(_NUMERIC.match(row[i]) or row[i] in ("", "—") for row in cells)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ]
        return (" " * indent + "  ".join(parts)).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def percent(share: float | None) -> str:
    """A share in [0, 1] as percent with its sign: 0.53 -> '53.0 %'."""
    return "—" if share is None else f"{100 * share:.1f} %"


def points(change: float | None) -> str:
    """A change of a share, in percentage points: 0.12 -> '+12.0 pp'."""
    return "—" if change is None else f"{100 * change:+.1f} pp"


def nats(value: float | None) -> str:
    """A mean NLL in nats per token."""
    return "—" if value is None else f"{value:.3f} nats/token"


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def size(n_bytes: int | None) -> str:
    """Bytes in the largest unit that keeps the number >= 1 (SI, as `du --si` prints)."""
    if n_bytes is None:
        return "—"
    if n_bytes < 1000:
        return f"{n_bytes} B"
    value = n_bytes / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


# Gate checks' metrics that are shares in [0, 1] (conflicts: of the new records).
PROPORTIONS = ("accuracy", "token_f1", "valid", "conflicts")


def check_value(metric: str, value: float | None) -> str:
    """A gate check's value with its unit: a share in %, an NLL in nats/token."""
    if value is None:
        return "—"
    if metric in PROPORTIONS:
        return percent(value)
    return nats(value) if metric == "nll" else f"{value:g}"


def check_threshold(metric: str, rule: str, value: float | None) -> str:
    """Thresholds: drops and gains of a share in points, relative ones in %, else as values."""
    if value is None:
        return "—"
    if rule in ("max_drop_rel", "max_conflict_share"):
        return percent(value)
    if metric in PROPORTIONS and rule in ("max_drop", "min_gain"):
        return points(value).lstrip("+")
    return check_value(metric, value)
