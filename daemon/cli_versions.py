"""CLI commands that read the registry: ``models``, ``models show N``, ``report``.

Light: no torch. ``models show`` is the registry's card for one version, as MLflow's model
registry shows one: its metrics, lineage, gate checks, bundle and audit log.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aftertune.daemon.errors import DaemonError
from aftertune.daemon.settings import Settings
from aftertune.daemon.tables import (
    check_threshold,
    check_value,
    nats,
    percent,
    points,
    size,
    table,
    when,
)
from aftertune.store.consumer.format import parse_version, version_dir_name
from aftertune.store.errors import BundleError
from aftertune.store.files import write_atomic
from aftertune.store.layout import StateLayout
from aftertune.store.records import printable
from aftertune.store.registry import Registry, Version
from aftertune.store.shadow import shadow_lines


def version_arg(text: str) -> int:
    """An argparse type: '3' or 'v3' -> 3, anything else a usage error naming the rule."""
    try:
        return parse_version(text)
    except BundleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register_version_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "models",
        parents=[common],
        help="model versions, states, key metrics; `models show N` for one version",
        description="List every model version in the registry: its state (candidate, "
        "evaluating, promoted, rejected, retired...), parent, when it was made, how many "
        "examples it was trained on and its held-out score per task; * marks the champion. "
        "Use it to see what was learned and decided; `models show N` for one version.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)
    models_sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=False)
    show = models_sub.add_parser(
        "show",
        parents=[common],
        help="one version: metrics, lineage, gate checks, bundle, audit log",
        description="One version's card: held-out metrics of champion and challenger per "
        "task, the chain of adapters it builds on, what it was trained on, the gate's "
        "decision with its reasons and every check, its published bundle and its audit log "
        "(who moved it to which state, and why). Use it to understand why a version was "
        "promoted or rejected.",
    )
    show.add_argument("version", type=version_arg, help="3 or v3")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_models_show)

    p = sub.add_parser(
        "report",
        parents=[common],
        help="an HTML page: gate checks, task x version heatmap, per-task charts, lineage, audit",
        description="Write one self-contained HTML page about VERSION (default: the newest): "
        "its gate checks, a task x version heatmap of held-out scores, per-task charts "
        "across versions, the lineage and the audit log; print its path. Use it to show or "
        "review what the loop learned in a browser; it needs no server. Written to "
        "STATE_DIR/report.html unless --html names another file.",
    )
    p.add_argument(
        "version", type=version_arg, nargs="?", default=None, help="3 or v3 (default: latest)"
    )
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="FILE",
        help="page to write (default: STATE_DIR/report.html)",
    )
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_report)


def headline(metrics: Mapping[str, Any]) -> str:
    """'parity 92.0 %, vowel_end 88.0 %': each task's challenger score."""
    parts = []
    for task, m in sorted(metrics.items()):
        new = m.get("challenger", {})
        metric = "accuracy" if "accuracy" in new else "token_f1"
        if metric in new:
            parts.append(f"{task} {percent(new[metric])}")
    return ", ".join(parts) or "—"


def _row(v: Version, champion: Version | None) -> dict[str, Any]:
    return {
        "version": v.version,
        "state": v.state.value,
        "champion": champion is not None and v.version == champion.version,
        "parent": v.parent,
        "created_at": v.created_at,
        "trained_on": v.lineage.get("trained_on", {}).get("count_by_task", {}),
        "metrics": v.metrics,
        "reasons": v.gate.get("reasons", []),
    }


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    with Registry(settings.state_dir, settings.store.url) as registry:
        champion = registry.champion()
        rows = [_row(v, champion) for v in registry.versions()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no model versions yet; the base model serves")
        return 0
    cells = [
        [
            f"{'*' if r['champion'] else ' '}v{r['version']}",
            r["state"],
            "—" if r["parent"] is None else f"v{r['parent']}",
            when(r["created_at"]),
            f"{sum(r['trained_on'].values())} examples",
            headline(r["metrics"]),
        ]
        for r in rows
    ]
    headers = ["version", "state", "parent", "created", "trained on", "held-out scores"]
    print(table(headers, cells))
    print("* = champion; `aftertune models show N` for one version")
    return 0


def cmd_models_show(args: argparse.Namespace, settings: Settings) -> int:
    with Registry(settings.state_dir, settings.store.url) as registry:
        champion = registry.champion()
        v = registry.get(args.version)
        audit = registry.audit_log(v.version)
    card = {
        **_row(v, champion),
        "lineage": v.lineage,
        "training": v.training,
        "gate": v.gate,
        "bundle": _bundle(settings, v.version),
        "audit": [
            {"at": e.at, "from": e.from_state, "to": e.to_state, "actor": e.actor, "why": e.reason}
            for e in audit
        ],
    }
    print(json.dumps(card, indent=2) if args.json else render_card(card))
    return 0


def _bundle(settings: Settings, version: int) -> dict[str, Any] | None:
    """The published bundle of ``version``: path, manifest sha256, size; None if none."""
    from aftertune.store.bundles import published

    bundles = StateLayout(settings.state_dir).bundles
    if not (bundles / version_dir_name(version)).is_dir():
        return None
    try:
        found = published(bundles, version)
    except BundleError as exc:
        return {"path": str(bundles / version_dir_name(version)), "error": str(exc)}
    files = found.manifest.get("files", {})
    return {
        "path": str(found.path),
        "manifest_sha256": found.manifest_sha256,
        "files": len(files),
        "bytes": sum(int(f.get("bytes", 0)) for f in files.values()),
        "precision": found.manifest.get("precision"),
    }


def render_card(card: dict[str, Any]) -> str:
    lineage = card["lineage"]
    chain = " → ".join(
        [f"base {lineage.get('base', '?')!s}"]
        + [f"v{a.get('version')}" for a in lineage.get("adapters", [])]
        + [f"v{card['version']}"]
    )
    lines = [
        f"v{card['version']}: {card['state']}{' (champion)' if card['champion'] else ''}",
        f"  created {when(card['created_at'])}, parent "
        + ("the base model" if card["parent"] is None else f"v{card['parent']}"),
        f"  chain: {chain}",
        f"  trained on: {_counts(card['trained_on'])}",
        "",
        "metrics (held-out):",
        metrics_table(card["metrics"]) if card["metrics"] else "  none recorded",
        "",
        _gate_text(card["gate"]),
        "",
        "bundle: " + _bundle_text(card["bundle"]),
        "",
        "audit log:",
        table(
            ["at", "from", "to", "actor", "why"],
            [
                [when(e["at"]), e["from"] or "—", e["to"], e["actor"], e["why"]]
                for e in card["audit"]
            ],
            indent=2,
        ),
    ]
    return "\n".join(printable(line) if "\n" not in line else line for line in lines)


def _counts(counts: Mapping[str, int]) -> str:
    if not counts:
        return "—"
    return ", ".join(f"{task} {n} examples" for task, n in sorted(counts.items()))


def _bundle_text(bundle: dict[str, Any] | None) -> str:
    if bundle is None:
        return "not published (only promoted versions are; older ones may be pruned)"
    if "error" in bundle:
        return f"{bundle['path']}: damaged ({bundle['error']})"
    return (
        f"{bundle['path']}, {bundle['files']} files, {size(bundle['bytes'])}, "
        f"{bundle['precision']}, manifest sha256 {bundle['manifest_sha256']}"
    )


def _gate_text(gate: Mapping[str, Any]) -> str:
    if not gate:
        return "gate: no decision recorded"
    checks = gate.get("checks", [])
    lines = [f"gate: {gate.get('decision', '?')}"]
    verdicts = gate.get("verdicts") or {}
    if verdicts:
        lines.append(
            "  verdicts: " + ", ".join(f"{task} {verdict}" for task, verdict in verdicts.items())
        )
    lines += [f"  - {r}" for r in gate.get("reasons", [])]
    if checks:
        rows = [
            [
                c.get("task", ""),
                c.get("suite", ""),
                c.get("metric", ""),
                c.get("rule", ""),
                check_value(c.get("metric", ""), c.get("champion")),
                check_value(c.get("metric", ""), c.get("challenger")),
                check_threshold(c.get("metric", ""), c.get("rule", ""), c.get("threshold")),
                "pass" if c.get("passed") else "FAIL",
            ]
            for c in sorted(checks, key=lambda c: bool(c.get("passed")))
        ]
        headers = ["task", "suite", "metric", "rule", "champion", "challenger", "threshold"]
        lines.append(table([*headers, "result"], rows, indent=2))
    return "\n".join(lines + shadow_lines(gate.get("shadow")))


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Champion vs challenger per task: headline score in %, its change in points, NLL."""
    rows = []
    for task, m in metrics.items():
        old, new = m.get("champion", {}), m.get("challenger", {})
        metric = "accuracy" if "accuracy" in new else "token_f1"
        change = new[metric] - old[metric] if metric in old and metric in new else None
        rows.append(
            [
                task,
                metric,
                percent(old.get(metric)),
                percent(new.get(metric)),
                points(change),
                nats(old.get("nll")),
                nats(new.get("nll")),
                new.get("n", "—"),
                chance_text(m.get("chance")),
            ]
        )
    headers = ["task", "metric", "champion", "challenger", "change", "NLL champion"]
    return table([*headers, "NLL challenger", "held-out n", "vs chance"], rows, indent=2)


def chance_text(chance: Mapping[str, Any] | None) -> str:
    """'above (needs > 67.4 %)', 'AT CHANCE (needs > 59.2 %)', or '—' (free text)."""
    if not chance:
        return "—"
    verdict = "AT CHANCE" if chance.get("at_chance") else "above"
    return f"{verdict} (needs > {percent(chance.get('threshold'))})"


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.report import render_report

    with Registry(settings.state_dir, settings.store.url) as registry:
        page = render_report(registry, args.version)
        versions = [v.version for v in registry.versions()]
    target: Path = args.html or StateLayout(settings.state_dir).report
    if args.html is None:
        target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.is_dir():
        raise DaemonError(f"cannot write {target}: the directory {target.parent} does not exist")
    write_atomic(target, page.encode("utf-8"))
    if args.json:
        shown = args.version if args.version is not None else (versions[-1] if versions else None)
        print(json.dumps({"path": str(target), "version": shown, "bytes": len(page.encode())}))
    else:
        print(target)
    return 0
