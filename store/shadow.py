"""Shadow evaluation's evidence: what answer servers report of a challenger they run beside
the champion on live traffic, and what the daemon counts of it.

One report is one entry of the stream ``redis.shadow_stream`` (``aftertune:shadow``), the
running totals of one answer-server process for one candidate bundle (docs/wire-format.md):

    server            that process's id (host:pid:random), new at each start
    version           the candidate's version
    manifest_sha256   the candidate bundle's manifest sha256, as the daemon announced it
    champion_version  the version that answered the clients when the report was sent
    compared          sampled records the candidate answered too
    agreed            of those, the candidate's answer equal to the champion's
    feedback          feedback received on an answer the candidate shadowed
    feedback_agreed   of those, the candidate agreed with the feedback
    sent_at           seconds since the Unix epoch

Anyone who can write to Redis can write such an entry. The daemon therefore counts a report
only for the version it is judging and the bundle it exported for it (``manifest_sha256``
equal to the registry's), only entries sent since that version began waiting, and only the
newest report of each ``server`` (totals, not increments: repeating a report adds nothing).
What a forger can still do is bounded by where the figure is used: it can hold back, or let
through, a challenger that already passed every held-out check, never promote another.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from aftertune.store.registry import Registry, Version, VersionState

MAX_COUNT = 10**12  # a report's counts are at most this (a larger one is not a report)
MAX_SERVER_CHARS = 200
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
COUNTS = ("compared", "agreed", "feedback", "feedback_agreed")


@dataclass(frozen=True)
class ShadowReport:
    """One answer server's running totals for one candidate bundle."""

    server: str
    version: int
    manifest_sha256: str
    champion_version: int
    compared: int
    agreed: int
    feedback: int
    feedback_agreed: int
    sent_at: float

    def fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        return {k: f"{v:.3f}" if k == "sent_at" else str(v) for k, v in asdict(self).items()}


def parse_report(fields: Mapping[Any, Any]) -> ShadowReport | None:
    """The report in one stream entry, or None when it is not a well-formed one."""
    found = {_text(k): _text(v) for k, v in fields.items()}
    try:
        ints = {name: int(found[name]) for name in ("version", "champion_version", *COUNTS)}
        sent_at = float(found["sent_at"])
    except (KeyError, ValueError):
        return None
    server, sha = found.get("server", ""), found.get("manifest_sha256", "")
    if not 0 < len(server) <= MAX_SERVER_CHARS or not _SHA256.match(sha):
        return None
    if ints["version"] < 1 or any(not 0 <= v <= MAX_COUNT for v in ints.values()):
        return None
    if ints["agreed"] > ints["compared"] or ints["feedback_agreed"] > ints["feedback"]:
        return None
    return ShadowReport(server=server, manifest_sha256=sha, sent_at=sent_at, **ints)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ShadowTally:
    """The evidence on one candidate: every answer server's newest report, summed."""

    compared: int = 0
    agreed: int = 0
    feedback: int = 0
    feedback_agreed: int = 0
    servers: int = 0  # answer servers that reported on this candidate
    ignored: int = 0  # entries about another version or bundle, or malformed

    @property
    def champion_share(self) -> float | None:
        """Share of shadowed answers equal to the champion's; None before the first."""
        return self.agreed / self.compared if self.compared else None

    @property
    def feedback_share(self) -> float | None:
        """Share of feedback the candidate agreed with; None before the first."""
        return self.feedback_agreed / self.feedback if self.feedback else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tally(entries: Iterable[Mapping[Any, Any]], version: int, manifest_sha256: str) -> ShadowTally:
    """What the stream entries (oldest first) say of ``version``'s bundle ``manifest_sha256``:
    the newest report of each server counted, everything else ignored."""
    newest: dict[str, ShadowReport] = {}
    ignored = 0
    for fields in entries:
        report = parse_report(fields)
        about = report is not None and (report.version, report.manifest_sha256)
        if report is None or about != (version, manifest_sha256):
            ignored += 1
        else:
            newest[report.server] = report  # a total: the newest replaces the older
    sums = {name: sum(getattr(r, name) for r in newest.values()) for name in COUNTS}
    return ShadowTally(servers=len(newest), ignored=ignored, **sums)


def shadow_candidate(registry: Registry) -> Version | None:
    """The version in shadow evaluation: awaiting a decision with a shadow section in its
    gate report (``learners/shadow_gate.py`` puts it there). None when there is none."""
    for version in registry.in_state(VersionState.AWAITING_APPROVAL):
        if isinstance(version.gate.get("shadow"), dict):
            return version
    return None


def stream_id_since(at: float) -> str:
    """The stream id of the first entry added at or after ``at`` (seconds since the epoch)."""
    return f"{int(at * 1000)}-0"


def shadow_lines(section: Mapping[str, Any] | None) -> list[str]:
    """The shadow evaluation in a version's gate report, as ``models show`` prints it."""
    if not section:
        return []
    counts = section.get("tally") or {}
    compared, agreed = int(counts.get("compared", 0)), int(counts.get("agreed", 0))
    feedback, fb_agreed = int(counts.get("feedback", 0)), int(counts.get("feedback_agreed", 0))
    lines = [
        f"live traffic (shadow): {section.get('status', '?')}, since "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(float(section.get('since', 0))))}",
        f"  with the champion: {agreed} of {compared} shadowed answers agree"
        + (f" ({100 * agreed / compared:.1f}%)" if compared else ""),
        f"  with feedback: {fb_agreed} of {feedback} agree"
        + (f" ({100 * fb_agreed / feedback:.1f}%)" if feedback else ""),
        f"  from {counts.get('servers', 0)} answer servers; "
        f"{counts.get('ignored', 0)} reports on other bundles or malformed, not counted",
    ]
    if section.get("reason"):
        lines.append(f"  - {section['reason']}")
    return lines
