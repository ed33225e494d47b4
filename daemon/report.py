"""`aftertune report`: one self-contained HTML page about the model versions.

The page needs no network and no JavaScript: inline CSS, and plots drawn as inline SVG. It
shows the champion, one version's gate decision check by check, a task x version heatmap of
headline scores, each task's headline score and NLL over versions, and that version's lineage
and audit log. The markup is ``templates/report.html.j2``; this module computes what it shows
(scores, colours, chart coordinates). Jinja2 autoescapes every value: task names, gate
messages and audit reasons come from users.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup

from aftertune.daemon.tables import check_threshold, check_value, when
from aftertune.learners.gate import PRIMARY
from aftertune.store.registry import Registry, Version, VersionState

# Versions that were champion at some point: their points carry the deployed model's line.
WAS_CHAMPION = frozenset({VersionState.PROMOTED, VersionState.RETIRED})
# One hue, light to dark: score 0 is near white, 100 the darkest blue, so "darker = better"
# reads without a key (a legend is drawn anyway). Stops of ColorBrewer's sequential "Blues".
BLUES = ((247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107))
STATE_COLOUR = {
    VersionState.PROMOTED: "#1e7b34",
    VersionState.RETIRED: "#5b7f65",
    VersionState.REJECTED: "#b3261e",
    VersionState.AWAITING_APPROVAL: "#9a6700",
}
OTHER_COLOUR = "#57606a"


@dataclass(frozen=True)
class Point:
    """One version's challenger score on one task."""

    version: int
    state: VersionState
    metric: str  # accuracy or token_f1
    score: float
    nll: float | None
    chance: float | None = None  # accuracy needed to beat the majority answer (label tasks)

    @property
    def at_chance(self) -> bool:
        return self.chance is not None and self.score <= self.chance + 1e-12


@dataclass(frozen=True)
class Heatmap:
    """Geometry of the task x version grid, in pixels; cells are laid out by the template."""

    versions: Sequence[Version]
    rows: list[tuple[str, dict[int, Point]]]  # task -> its points by version
    mark: int  # column of the version the page is about
    cell_w: int
    cell_h: int = 26
    left: int = 190
    top: int = 46

    @property
    def width(self) -> int:
        return self.left + self.cell_w * len(self.versions) + 10

    @property
    def height(self) -> int:
        return self.top + self.cell_h * len(self.rows) + 8


@dataclass(frozen=True)
class Marker:
    """One point on a chart: ``kind`` picks its shape (champion, rejected or other)."""

    kind: str
    x: float
    y: float
    tip: str


@dataclass(frozen=True)
class Chart:
    """An SVG line chart, ready to draw: every coordinate in pixels."""

    w: int
    h: int
    left: int
    right: int
    grid: list[tuple[float, str]]  # (y, value label)
    ticks: list[tuple[float, str]]  # (x, version label)
    line: str  # polyline points joining the champions; empty when none
    markers: list[Marker]


@dataclass(frozen=True)
class TaskCharts:
    task: str
    metric: str
    score: Chart
    nll: Chart | None


def headline(scores: Mapping[str, Any]) -> tuple[str, float] | None:
    """A task's headline score (accuracy or token_f1, whichever it has)."""
    for metric in PRIMARY:
        value = _finite(scores.get(metric))
        if value is not None:
            return metric, value
    return None


def _finite(value: object) -> float | None:
    """A number worth plotting: a diverged run records NaN or inf, which has no place on an axis."""
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def task_points(versions: Sequence[Version]) -> dict[str, list[Point]]:
    """task -> the challenger's headline score of every version that has one, oldest first."""
    out: dict[str, list[Point]] = {}
    for v in versions:
        for task, entry in v.metrics.items():
            scores = entry.get("challenger", {}) if isinstance(entry, dict) else {}
            found = headline(scores)
            if found is None:
                continue
            nll = _finite(scores.get("nll"))
            chance = _finite((entry.get("chance") or {}).get("threshold"))
            point = Point(v.version, v.state, found[0], found[1], nll, chance)
            out.setdefault(task, []).append(point)
    return dict(sorted(out.items()))


def render_report(registry: Registry, version: int | None = None) -> str:
    """The whole page for ``version`` (default: the latest). Raises RegistryError if unknown."""
    template = _environment().get_template("report.html.j2")
    versions = registry.versions()
    if version is None and not versions:
        return template.render(selected=None)
    selected = registry.get(version) if version is not None else versions[-1]
    champion = registry.champion()
    points = task_points(versions)
    return template.render(
        selected=selected,
        versions=versions,
        champion=champion,
        promoted_at=registry.promoted_at(champion.version) if champion else None,
        source=champion or versions[-1],
        summary=_state_summary(versions),
        generated=time.time(),
        checks=_failures_first(selected.gate.get("checks", [])),
        shadow=_shadow(selected.gate.get("shadow")),
        scores=_score_rows(selected),
        legend=[(i / 4, score_colour(i / 4)) for i in range(5)],
        heatmap=_heatmap(versions, points, selected.version) if points else None,
        charts=_task_charts(versions, points),
        trained_rows=_trained_rows(selected.lineage),
        data_seq=_seq_range(selected.lineage),
        audit=registry.audit_log(selected.version),
    )


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("aftertune.daemon", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_escape,
    )
    env.filters.update(when=when, num=_num, short=_short, colour=score_colour)
    env.globals.update(check_value=check_value, check_threshold=check_threshold)
    env.globals.update(badge_colour=_badge_colour, state_colour=_state_colour)
    return env


def _escape(value: object) -> object:
    """Autoescape as ``html.escape`` spells it (``&quot;``, not markupsafe's ``&#34;``): the
    same bytes as the page before it was a template."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _num(value: object) -> object:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _badge_colour(state: str) -> str:
    return next((c for s, c in STATE_COLOUR.items() if s.value == state), OTHER_COLOUR)


def _state_colour(state: VersionState) -> str:
    return STATE_COLOUR.get(state, OTHER_COLOUR)


def score_colour(t: float) -> str:
    """The heatmap's colour of a score in [0, 1]: monotone, lighter is lower."""
    t = min(max(t, 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(t), len(BLUES) - 2)
    a, b = BLUES[i], BLUES[i + 1]
    r, g, bl = (round(x + (y - x) * (t - i)) for x, y in zip(a, b, strict=True))
    return f"#{r:02x}{g:02x}{bl:02x}"


def _state_summary(versions: Sequence[Version]) -> str:
    counts = {s: sum(v.state is s for v in versions) for s in VersionState}
    return ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)


def _failures_first(checks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(checks, key=lambda c: c.get("passed") is not False)  # stable: order kept


def _shadow(section: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A version's shadow evaluation on live traffic (gate report section ``shadow``), with
    each agreement as a share; None when it had none."""
    if not isinstance(section, Mapping):
        return None
    counts = section.get("tally") or {}

    def count(name: str) -> int:
        value = counts.get(name, 0)
        return value if isinstance(value, int) else 0

    def share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    compared, feedback = count("compared"), count("feedback")
    return {
        "status": str(section.get("status", "?")),
        "since": _finite(section.get("since")),
        "judged_on": section.get("judged_on"),
        "reason": str(section.get("reason", "")),
        "rows": [
            ("the champion's answer", count("agreed"), compared, share(count("agreed"), compared)),
            (
                "feedback",
                count("feedback_agreed"),
                feedback,
                share(count("feedback_agreed"), feedback),
            ),
        ],
        "servers": count("servers"),
        "ignored": count("ignored"),
    }


def _score_rows(version: Version) -> list[dict[str, Any]]:
    """The selected version's scores per task, champion beside challenger, with chance."""
    rows = []
    for task, entry in sorted(version.metrics.items()):
        if not isinstance(entry, dict):
            continue
        new, old = entry.get("challenger", {}), entry.get("champion", {})
        found = headline(new)
        if found is None:
            continue
        metric, score = found
        chance = entry.get("chance") or {}
        rows.append(
            {
                "task": task,
                "metric": metric,
                "champion": _finite(old.get(metric)),
                "challenger": score,
                "nll_champion": _finite(old.get("nll")),
                "nll_challenger": _finite(new.get("nll")),
                "n": new.get("n"),
                "majority": _finite(chance.get("majority")),
                "needed": _finite(chance.get("threshold")),
                "at_chance": bool(chance.get("at_chance")),
            }
        )
    return rows


def _heatmap(versions: Sequence[Version], points: dict[str, list[Point]], mark: int) -> Heatmap:
    # Narrower cells for long histories; below 50 px a state's name is cut to 3 letters.
    cell_w = max(34, min(56, 900 // len(versions)))
    rows = [(task, {p.version: p for p in pts}) for task, pts in points.items()]
    col = next(i for i, v in enumerate(versions) if v.version == mark)
    return Heatmap(versions, rows, col, cell_w)


def _task_charts(versions: Sequence[Version], points: dict[str, list[Point]]) -> list[TaskCharts]:
    if not points:
        return []
    span = (versions[0].version, versions[-1].version)
    out = []
    for task, pts in points.items():
        score = line_chart([(p, p.score) for p in pts], span, lambda v: f"{100 * v:.0f}", (0, 1))
        with_nll = [(p, p.nll) for p in pts if p.nll is not None]
        nll = line_chart(with_nll, span, None, floor=0.0) if with_nll else None
        out.append(TaskCharts(task, pts[-1].metric, score, nll))
    return out


def _marker_kind(state: VersionState) -> str:
    if state in WAS_CHAMPION:
        return "champion"
    return "rejected" if state is VersionState.REJECTED else "other"


def nice_ticks(lo: float, hi: float, count: int = 4) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^k) and the decimals that
    tell every one apart."""
    if hi - lo < 1e-12:
        lo, hi = lo - max(abs(lo) * 0.1, 0.05), hi + max(abs(hi) * 0.1, 0.05)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    value = first
    while value < hi + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return ticks, decimals


def line_chart(
    points: Sequence[tuple[Point, float]],
    span: tuple[int, int],
    fmt: Callable[[float], str] | None,
    fixed: tuple[float, float] | None = None,
    floor: float | None = None,
) -> Chart:
    """A chart of (point, value) over versions; champions joined by a line.

    ``fixed``: the axis range (scores: 0 to 1) with five grid lines; otherwise the axis is
    scaled to the data, on round ticks, never below ``floor`` (an NLL is never negative).
    """
    w, h, left, right, top, bottom = 270, 170, 44, 12, 10, 26
    decimals = 2
    if fixed is not None:
        lo, hi = fixed
        values = [lo + (hi - lo) * i / 4 for i in range(5)]
    else:
        values, decimals = nice_ticks(min(v for _, v in points), max(v for _, v in points))
        if floor is not None:
            values = [v for v in values if v >= floor] or [floor]
        lo, hi = values[0], values[-1]
        if hi - lo < 1e-12:
            hi = lo + 1.0
            values = [lo, hi]
    label = fmt or (lambda v: f"{v:.{decimals}f}")
    first, last = span
    step = max(1, last - first)

    def sx(version: int) -> float:
        return left + (w - left - right) * ((version - first) / step if last > first else 0.5)

    def sy(value: float) -> float:
        return top + (h - top - bottom) * (1 - (value - lo) / (hi - lo))

    grid = [(sy(value), label(value)) for value in values]
    every = -(-(last - first + 1) // 6)  # at most six version labels fit under a chart
    ticks = [(sx(version), f"v{version}") for version in range(first, last + 1, every)]
    line = " ".join(
        f"{sx(p.version):.1f},{sy(v):.1f}" for p, v in points if p.state in WAS_CHAMPION
    )
    markers = [
        Marker(
            _marker_kind(p.state),
            sx(p.version),
            sy(v),
            f"v{p.version} ({p.state.value}): {label(v)}",
        )
        for p, v in points
    ]
    return Chart(w, h, left, right, grid, ticks, line, markers)


def _trained_rows(lineage: Mapping[str, Any]) -> list[tuple[str, object, object]]:
    """(task, new examples, replayed examples) for every task the version trained on."""
    counts = lineage.get("trained_on", {}).get("count_by_task", {})
    replayed = lineage.get("replayed", {})
    merged = {**dict.fromkeys(replayed, 0), **counts}
    return [(task, n, replayed.get(task, 0)) for task, n in sorted(merged.items())]


def _seq_range(lineage: Mapping[str, Any]) -> str:
    seq = lineage.get("trained_on", {}).get("seq_range")
    return f"{seq[0]}–{seq[1]}" if isinstance(seq, list) and len(seq) == 2 else "—"
