"""CLI commands about models: train, eval, cycle, models, report, rollback, approve, reject, base.

Commands that learn import torch lazily, inside the command; the registry commands stay light.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from aftertune.daemon.settings import Settings
from aftertune.store.files import write_atomic
from aftertune.store.layout import StateLayout
from aftertune.store.records import printable


def register_model_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the model commands to the top-level subparsers."""
    for add in (
        _add_train,
        _add_eval,
        _add_base,
        _add_cycle,
        _add_models,
        _add_report,
        _add_rollback,
        _add_approve,
        _add_reject,
    ):
        add(sub, common)


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train one candidate on the train examples added since the champion was made",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_train)


def _add_eval(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval", parents=[common], help="score the champion (and a candidate) on held-out data"
    )
    p.add_argument("--candidate", type=int, default=None, metavar="VERSION", help="also score it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval)


def _add_base(sub: Any, common: argparse.ArgumentParser) -> None:
    base = sub.add_parser("base", parents=[common], help="the embedded base model")
    base_sub = base.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    p = base_sub.add_parser(
        "build",
        parents=[common],
        help="pretrain the embedded tiny base from scratch (reproduces the shipped weights)",
    )
    p.add_argument("--out", type=Path, required=True, help="directory to write the model to")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as shipped)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: as shipped)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (the shipped build used 2 on CPU; the count changes the bits)",
    )
    p.set_defaults(func=cmd_base_build)


def _add_cycle(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "cycle",
        parents=[common],
        help="one learning cycle: train (or resume) a challenger, evaluate, gate, decide; "
        "a promotion exports, parity-checks and publishes the bundle",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cycle)


def _add_models(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="model versions, states, key metrics")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)


def _add_report(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report",
        parents=[common],
        help="an HTML page: gate checks, task x version heatmap, per-task charts, lineage, audit",
    )
    p.add_argument("version", type=int, nargs="?", default=None, help="version (default: latest)")
    p.add_argument("--html", type=Path, required=True, metavar="FILE", help="page to write")
    p.set_defaults(func=cmd_report)


def _add_rollback(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "rollback",
        parents=[common],
        help="make a retired former champion the champion again and republish its bundle",
    )
    p.add_argument("version", type=int, help="version to roll back to")
    p.add_argument("--why", default="", help="reason, kept in the audit log")
    p.set_defaults(func=cmd_rollback)


def _add_approve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "approve", parents=[common], help="export, promote and publish a version awaiting approval"
    )
    p.add_argument("version", type=int)
    p.add_argument("--why", default="approved by hand", help="reason, kept in the audit log")
    p.set_defaults(func=cmd_approve)


def _add_reject(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("reject", parents=[common], help="reject a version awaiting approval")
    p.add_argument("version", type=int)
    p.add_argument("--why", required=True, help="reason, kept in the audit log")
    p.set_defaults(func=cmd_reject)


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import run_train

    report = run_train(settings, actor=_actor())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(
        f"candidate v{report.candidate}: {report.new_examples} new + {report.replay_examples} "
        f"replayed examples, {report.steps} steps, loss {report.loss_first:.3f} -> "
        f"{report.loss_last:.3f}, {report.tokens_per_s:,.0f} tokens/s, "
        f"train {report.train_seconds:.1f}s, Fisher {report.fisher_seconds:.1f}s"
    )
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import run_eval

    result = run_eval(settings, args.candidate)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    tables = result if args.candidate is not None else {"champion": result}
    for who, scores in tables.items():
        print(f"{who}:")
        if not scores:
            print("  no held-out examples yet")
        for task, score in scores.items():
            metric = "accuracy" if "accuracy" in score else "token_f1"
            print(
                f"  {task:<24} {metric} {100 * score[metric]:6.1f}  nll {score['nll']:.3f}  n {score['n']}"
            )
    return 0


def cmd_base_build(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from aftertune.learners import pretrain

    build = dict(pretrain.SHIPPED_BUILD)
    if args.steps is not None:
        build["steps"] = args.steps
    if args.seed is not None:
        build["seed"] = args.seed
    torch.set_num_threads(args.threads)
    report = pretrain.build_embedded_base(args.out, device=args.device, **build)
    print(pretrain.render_build_md(report))
    return 0


def cmd_cycle(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import run_cycle_once

    try:
        result = run_cycle_once(settings, actor=_actor())
    finally:  # also a bundle this run repaired as latest before it stopped
        _announce(settings)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"v{result.version}: {result.decision.value}")
    if result.bundle is not None:
        print(f"  published {result.bundle.path} (manifest sha256 {result.bundle.manifest_sha256})")
    for reason in result.reasons:
        print(f"  - {printable(reason)}")
    for task, m in result.metrics.items():
        old, new = m["champion"], m["challenger"]
        metric = "accuracy" if "accuracy" in new else "token_f1"
        print(
            f"  {task:<24} {metric} {100 * old[metric]:6.1f} -> {100 * new[metric]:6.1f}"
            f"   nll {old['nll']:.3f} -> {new['nll']:.3f}   n {new['n']}"
        )
    return 0


def _headline(metrics: dict[str, Any]) -> str:
    parts = []
    for task, m in sorted(metrics.items()):
        new = m.get("challenger", {})
        metric = "accuracy" if "accuracy" in new else "token_f1"
        if metric in new:
            parts.append(f"{task} {100 * new[metric]:.0f}")
    return ", ".join(parts)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.registry import Registry

    with Registry(settings.state_dir, settings.store.url) as registry:
        champion = registry.champion()
        rows = [
            {
                "version": v.version,
                "state": v.state.value,
                "champion": champion is not None and v.version == champion.version,
                "parent": v.parent,
                "created_at": v.created_at,
                "trained_on": v.lineage.get("trained_on", {}).get("count_by_task", {}),
                "metrics": v.metrics,
                "reasons": v.gate.get("reasons", []),
            }
            for v in registry.versions()
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no model versions yet; the base model serves")
    for row in rows:
        mark = "*" if row["champion"] else " "
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created_at"]))
        print(f"{mark} v{row['version']:<4} {row['state']:<18} {made}  {_headline(row['metrics'])}")
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.report import render_report
    from aftertune.store.registry import Registry

    with Registry(settings.state_dir, settings.store.url) as registry:
        page = render_report(registry, args.version)
    target: Path = args.html
    if not target.parent.is_dir():
        raise_refused(f"cannot write {target}: the directory {target.parent} does not exist")
    write_atomic(target, page.encode("utf-8"))
    print(target)
    return 0


def _announce(settings: Settings) -> None:
    """Send the promotion event of ``latest`` unless the stream's newest event names it.

    If Redis is unreachable the daemon sends it when it starts.
    """
    import redis

    from aftertune.daemon.announce import announce_if_missed
    from aftertune.daemon.embedded_redis import redis_connection

    bundles = StateLayout(settings.state_dir).bundles
    if not bundles.is_dir():
        return
    try:
        with redis_connection(settings.redis.url, settings.state_dir) as client:
            announce_if_missed(client, settings.redis.promotions_stream, bundles)
    except (redis.RedisError, OSError) as exc:
        print(
            f"warning: the promotion event of the latest bundle was not sent ({exc}); "
            "the daemon sends it when it starts",
            file=sys.stderr,
        )


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import rollback

    bundle = rollback(settings, args.version, actor=_actor(), why=args.why)
    print(f"v{args.version} is the champion again")
    if bundle is not None:
        _announce(settings)
        print(f"  {bundle.path} is latest again")
    return 0


def _awaiting(registry: Any, version: int, verb: str) -> Any:
    """The version, refused unless it awaits a human decision."""
    from aftertune.store.registry import VersionState

    found = registry.get(version)
    if found.state is not VersionState.AWAITING_APPROVAL:
        raise_refused(
            f"v{version} is {found.state.value}, not awaiting approval; nothing to {verb}"
        )
    return found


def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import approve
    from aftertune.store.registry import Registry

    with Registry(settings.state_dir, settings.store.url) as registry:
        _awaiting(registry, args.version, "approve")
    bundle = approve(settings, args.version, actor=_actor(), why=args.why)
    print(f"v{args.version} approved and promoted to champion")
    if bundle is not None:
        _announce(settings)
        print(f"  published {bundle.path}")
    return 0


def cmd_reject(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.store.examples import ExampleStore
    from aftertune.store.registry import Registry, VersionState

    with Registry(settings.state_dir, settings.store.url) as registry:
        version = _awaiting(registry, args.version, "reject")
        seq_range = version.lineage.get("trained_on", {}).get("seq_range")
        if seq_range:  # set the batch aside first, as the gate does, then decide
            with ExampleStore.in_state_dir(settings.state_dir, settings.store.url) as store:
                store.quarantine(int(seq_range[0]), int(seq_range[1]), args.version)
        registry.transition(args.version, VersionState.REJECTED, actor=_actor(), reason=args.why)
    print(f"v{args.version} rejected")
    return 0


def raise_refused(message: str) -> None:
    from aftertune.daemon.errors import DaemonError

    raise DaemonError(message)
