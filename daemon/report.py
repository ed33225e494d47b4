"""`aftertune report`: one self-contained HTML page about the model versions.

The page needs no network and no JavaScript: inline CSS, and plots drawn here as inline SVG.
It shows the champion, one version's gate decision check by check, a task x version heatmap
of headline scores, each task's headline score and NLL over versions, and that version's
lineage and audit log. Every string from the registry (task names, gate messages, audit
reasons) passes through ``html.escape``: they come from users.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aftertune.learners.gate import PRIMARY
from aftertune.store.registry import AuditEntry, Registry, Version, VersionState

# Versions that were champion at some point: their points carry the deployed model's line.
WAS_CHAMPION = frozenset({VersionState.PROMOTED, VersionState.RETIRED})
# Viridis stops (colour-blind safe, dark = low): heatmap cells from score 0 to 1.
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
STATE_COLOUR = {
    VersionState.PROMOTED: "#1e7b34",
    VersionState.RETIRED: "#5b7f65",
    VersionState.REJECTED: "#b3261e",
    VersionState.AWAITING_APPROVAL: "#9a6700",
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1220px;margin:0 auto;padding:20px 28px 40px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px}.muted{color:#656d76}code{font-size:12.5px}
.facts{display:flex;flex-wrap:wrap;gap:8px 28px;margin:10px 0}.facts b{display:block;font-size:12px;color:#656d76;font-weight:500}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #d0d7de;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.text{overflow-wrap:anywhere}td.when{white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.pass td.verdict{background:#dafbe1;color:#116329;font-weight:600}tr.fail td{background:#fff1f0}
tr.fail td.verdict{background:#ffd8d3;color:#a40e26;font-weight:700}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;color:#fff;font-weight:600;font-size:13px}
ul.reasons{margin:6px 0 12px;padding-left:20px}.scroll{overflow-x:auto}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:6px 18px}
.chart h3{margin:10px 0 0}svg text{font-family:system-ui,sans-serif}
.legend span{margin-right:16px;white-space:nowrap}.legend svg{vertical-align:middle;margin-right:4px}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(at: float | None) -> str:
    return "—" if at is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


def _num(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _badge(state: str) -> str:
    colour = next((c for s, c in STATE_COLOUR.items() if s.value == state), "#57606a")
    return f'<span class="badge" style="background:{colour}">{esc(state)}</span>'


@dataclass(frozen=True)
class Point:
    """One version's challenger score on one task."""

    version: int
    state: VersionState
    metric: str  # accuracy or token_f1
    score: float
    nll: float | None


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
            out.setdefault(task, []).append(Point(v.version, v.state, found[0], found[1], nll))
    return dict(sorted(out.items()))


def render_report(registry: Registry, version: int | None = None) -> str:
    """The whole page for ``version`` (default: the latest). Raises RegistryError if unknown."""
    versions = registry.versions()
    champion = registry.champion()
    if version is None and not versions:
        body = (
            "<h1>aftertune report</h1><p>No model versions yet; the base model serves. "
            "A version appears after <code>aftertune cycle</code> (or <code>train</code>).</p>"
        )
        return _page(body)
    selected = registry.get(version) if version is not None else versions[-1]
    points = task_points(versions)
    sections = [
        _header(registry, versions, champion),
        _gate_section(selected),
        _heatmap_section(versions, points, selected.version),
        _charts_section(versions, points),
        _lineage_section(selected),
        _audit_section(registry.audit_log(selected.version)),
    ]
    return _page("".join(sections))


def _page(body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>aftertune report</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def _header(registry: Registry, versions: Sequence[Version], champion: Version | None) -> str:
    counts = {s: sum(v.state is s for v in versions) for s in VersionState}
    summary = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    source = champion or versions[-1]
    sha = str(source.lineage.get("base_sha256", ""))
    if champion is None:
        serving = "base model (no champion yet)"
        since = "—"
    else:
        serving = f"v{champion.version}"
        since = _when(registry.promoted_at(champion.version))
    facts = [
        ("champion", esc(serving)),
        ("promoted", esc(since)),
        ("base", esc(source.lineage.get("base", "—"))),
        ("base sha256", f"<code>{esc(sha[:12] or '—')}</code>"),
        ("versions", f"{len(versions)} ({esc(summary)})"),
        ("generated", esc(_when(time.time()))),
    ]
    items = "".join(f"<div><b>{k}</b>{v}</div>" for k, v in facts)
    return f'<h1>aftertune report</h1><div class="facts">{items}</div>'


def _gate_section(v: Version) -> str:
    head = f"<h2>Gate: v{v.version} {_badge(v.state.value)}</h2>"
    if not v.gate:
        return head + f'<p class="muted">No gate decision recorded for v{v.version}.</p>'
    decision = str(v.gate.get("decision", "?"))
    reasons = "".join(f"<li>{esc(r)}</li>" for r in v.gate.get("reasons", []))
    checks = list(v.gate.get("checks", []))
    checks.sort(key=lambda c: c.get("passed") is not False)  # failures first, order kept
    rows = []
    for c in checks:
        passed = c.get("passed")
        kind, word = ("pass", "pass") if passed else ("fail", "FAIL")
        if passed is None:
            kind, word = "", "n/a"
        task = f'<td class="text">{esc(c.get("task", ""))}</td>'
        cells = [esc(c.get(k, "")) for k in ("suite", "metric", "rule")]
        nums = [_num(c.get(k)) for k in ("champion", "challenger", "threshold")]
        rows.append(
            f'<tr class="{kind}">{task}'
            + "".join(f"<td>{x}</td>" for x in cells)
            + "".join(f'<td class="num">{x}</td>' for x in nums)
            + f'<td class="verdict">{word}</td><td class="text">{esc(c.get("message", ""))}</td></tr>'
        )
    heads = [
        "task",
        "suite",
        "metric",
        "rule",
        "champion",
        "challenger",
        "threshold",
        "result",
        "message",
    ]
    table = (
        "<table><tr>"
        + "".join(f"<th>{h}</th>" for h in heads)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    return (
        head
        + f"<p>Decision: {_badge(decision)} — {len(checks)} checks, failures first.</p>"
        + f'<ul class="reasons">{reasons}</ul>'
        + table
    )


def _viridis(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    r, g, bl = (round(x + (y - x) * (t - i)) for x, y in zip(a, b, strict=True))
    return f"#{r:02x}{g:02x}{bl:02x}"


def _heatmap_section(versions: Sequence[Version], points: dict[str, list[Point]], mark: int) -> str:
    head = "<h2>Headline score by task and version</h2>"
    if not points:
        return head + '<p class="muted">No version has metrics yet.</p>'
    # Narrower cells for long histories; below 50 px a state's name is cut to 3 letters.
    cell_w, cell_h, left, top = max(34, min(56, 900 // len(versions))), 26, 190, 46
    width = left + cell_w * len(versions) + 10
    height = top + cell_h * len(points) + 8
    out = [f'<svg class="heatmap" width="{width}" height="{height}" role="img">']
    for col, v in enumerate(versions):
        x = left + col * cell_w + cell_w / 2
        colour = STATE_COLOUR.get(v.state, "#57606a")
        weight = ' font-weight="700"' if v.version == mark else ""
        out.append(
            f'<text x="{x}" y="18" text-anchor="middle" font-size="13"{weight}>v{v.version}</text>'
            f'<text x="{x}" y="34" text-anchor="middle" font-size="10" fill="{colour}">'
            f"{esc(v.state.value.split('_')[0][: 12 if cell_w >= 50 else 3])}</text>"
        )
    for row, (task, pts) in enumerate(points.items()):
        y = top + row * cell_h
        by_version = {p.version: p for p in pts}
        out.append(
            f'<text x="{left - 8}" y="{y + cell_h / 2 + 4}" text-anchor="end" font-size="12">'
            f"<title>{esc(task)}</title>{esc(_short(task, 26))}</text>"
        )
        for col, v in enumerate(versions):
            x = left + col * cell_w
            p = by_version.get(v.version)
            rejected = v.state is VersionState.REJECTED
            stroke = 'stroke="#b3261e" stroke-width="2" stroke-dasharray="4 2"' if rejected else ""
            if p is None:
                tip = f"{task}, v{v.version} ({v.state.value}): no score"
                out.append(
                    f'<rect class="cell" x="{x + 1}" y="{y + 1}" width="{cell_w - 2}" '
                    f'height="{cell_h - 2}" fill="#eaeef2" {stroke}><title>{esc(tip)}</title></rect>'
                )
                continue
            tip = f"{task}, v{v.version} ({v.state.value}): {p.metric} {p.score:.3f}"
            ink = "#000" if p.score > 0.55 else "#fff"
            out.append(
                f'<rect class="cell" x="{x + 1}" y="{y + 1}" width="{cell_w - 2}" '
                f'height="{cell_h - 2}" fill="{_viridis(p.score)}" {stroke}>'
                f"<title>{esc(tip)}</title></rect>"
                f'<text x="{x + cell_w / 2}" y="{y + cell_h / 2 + 4}" text-anchor="middle" '
                f'font-size="11" fill="{ink}">{100 * p.score:.0f}</text>'
            )
    col = next(i for i, v in enumerate(versions) if v.version == mark)
    out.append(
        f'<rect x="{left + col * cell_w}" y="{top}" width="{cell_w}" '
        f'height="{cell_h * len(points)}" fill="none" stroke="#0969da" stroke-width="2"/></svg>'
    )
    note = (
        '<p class="muted">Challenger accuracy (or token F1) ×100, each version scored on its own '
        "cycle's held-out data. Dashed red outline: rejected. Blue frame: the version this "
        "page is about. Grey: no score.</p>"
    )
    return head + f'<div class="scroll">{"".join(out)}</div>' + note


def _marker(p: Point, x: float, y: float, value: str) -> str:
    tip = f"<title>v{p.version} ({esc(p.state.value)}): {value}</title>"
    if p.state in WAS_CHAMPION:
        return f'<circle class="point champion" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#1e7b34">{tip}</circle>'
    if p.state is VersionState.REJECTED:
        d = f"M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}M{x - 4:.1f},{y + 4:.1f}L{x + 4:.1f},{y - 4:.1f}"
        return (
            f'<path class="point rejected" d="{d}" stroke="#b3261e" stroke-width="2.5">{tip}</path>'
        )
    return (
        f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="#fff" stroke="#57606a" '
        f'stroke-width="2">{tip}</circle>'
    )


def line_chart(
    points: Sequence[tuple[Point, float]],
    span: tuple[int, int],
    fmt: Callable[[float], str],
    fixed: tuple[float, float] | None = None,
) -> str:
    """An SVG chart of (point, value) over versions; champions joined by a line."""
    w, h, left, right, top, bottom = 270, 170, 44, 12, 10, 26
    lo, hi = fixed or (min(v for _, v in points), max(v for _, v in points))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    if fixed is None:
        pad = 0.08 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    first, last = span
    step = max(1, last - first)

    def sx(version: int) -> float:
        return left + (w - left - right) * ((version - first) / step if last > first else 0.5)

    def sy(value: float) -> float:
        return top + (h - top - bottom) * (1 - (value - lo) / (hi - lo))

    out = [f'<svg width="{w}" height="{h}" role="img">']
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        y = sy(value)
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
            f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="#656d76">{fmt(value)}</text>'
        )
    every = -(-(last - first + 1) // 6)  # at most six version labels fit under a chart
    for version in range(first, last + 1, every):
        out.append(
            f'<text x="{sx(version):.1f}" y="{h - 8}" text-anchor="middle" font-size="10" '
            f'fill="#656d76">v{version}</text>'
        )
    line = " ".join(
        f"{sx(p.version):.1f},{sy(v):.1f}" for p, v in points if p.state in WAS_CHAMPION
    )
    if line:
        out.append(f'<polyline points="{line}" fill="none" stroke="#1e7b34" stroke-width="1.5"/>')
    out += [_marker(p, sx(p.version), sy(v), fmt(v)) for p, v in points]
    return "".join(out) + "</svg>"


def _legend() -> str:
    def icon(marker: str) -> str:
        return f'<svg width="14" height="14">{marker}</svg>'

    dot = Point(0, VersionState.PROMOTED, "", 0, None)
    cross = Point(0, VersionState.REJECTED, "", 0, None)
    other = Point(0, VersionState.CANDIDATE, "", 0, None)
    return (
        '<p class="legend muted">'
        f"<span>{icon(_marker(dot, 7, 7, ''))}champion (promoted or retired; joined)</span>"
        f"<span>{icon(_marker(cross, 7, 7, ''))}rejected</span>"
        f"<span>{icon(_marker(other, 7, 7, ''))}not decided yet</span></p>"
    )


def _charts_section(versions: Sequence[Version], points: dict[str, list[Point]]) -> str:
    head = "<h2>Each task over versions</h2>"
    if not points:
        return ""
    span = (versions[0].version, versions[-1].version)
    charts = []
    for task, pts in points.items():
        metric = pts[-1].metric
        score = line_chart([(p, p.score) for p in pts], span, lambda v: f"{100 * v:.0f}", (0, 1))
        with_nll = [(p, p.nll) for p in pts if p.nll is not None]
        nll = line_chart(with_nll, span, lambda v: f"{v:.2f}") if with_nll else ""
        charts.append(
            f'<div class="chart"><h3>{esc(task)}</h3>'
            f'<span class="muted">{esc(metric)} ×100 (higher is better) · NLL (lower is better)'
            f"</span><br>{score}{nll}</div>"
        )
    return head + _legend() + f'<div class="charts">{"".join(charts)}</div>'


def _lineage_section(v: Version) -> str:
    lin = v.lineage
    base_sha = str(lin.get("base_sha256", ""))
    chain = [f"base <code>{esc(base_sha[:12] or '?')}</code>"]
    for a in lin.get("adapters", []):
        chain.append(f"v{esc(a.get('version'))} <code>{esc(str(a.get('sha256', ''))[:12])}</code>")
    chain.append(f"<b>v{v.version}</b> (this version)")
    trained = lin.get("trained_on", {})
    counts = trained.get("count_by_task", {})
    replayed = lin.get("replayed", {})
    rows = "".join(
        f'<tr><td class="text">{esc(task)}</td><td class="num">{esc(n)}</td>'
        f'<td class="num">{esc(replayed.get(task, 0))}</td></tr>'
        for task, n in sorted({**dict.fromkeys(replayed, 0), **counts}.items())
    )
    table = (
        "<table style='width:auto'><tr><th>task</th><th>new examples</th><th>replayed</th></tr>"
        f"{rows}</table>"
        if rows
        else '<p class="muted">No training data recorded.</p>'
    )
    seq = trained.get("seq_range")
    facts = [
        ("parent", f"v{v.parent}" if v.parent is not None else "base model"),
        ("created", _when(v.created_at)),
        ("data seq", f"{seq[0]}–{seq[1]}" if isinstance(seq, list) and len(seq) == 2 else "—"),
        ("ids sha256", str(trained.get("ids_sha256", "—"))[:16]),
    ]
    items = "".join(f"<div><b>{k}</b>{esc(val)}</div>" for k, val in facts)
    return (
        f"<h2>Lineage of v{v.version}</h2><p>Adapter chain: {' → '.join(chain)}</p>"
        f'<div class="facts">{items}</div>{table}'
    )


def _audit_section(entries: Sequence[AuditEntry]) -> str:
    rows = "".join(
        f'<tr><td class="when">{esc(_when(e.at))}</td><td>{esc(e.from_state or "—")} → '
        f'{esc(e.to_state)}</td><td>{esc(e.actor)}</td><td class="text">{esc(e.reason)}</td></tr>'
        for e in entries
    )
    return (
        "<h2>Audit log</h2><table><tr><th>at</th><th>state</th><th>actor</th><th>reason</th>"
        f"</tr>{rows}</table>"
    )
