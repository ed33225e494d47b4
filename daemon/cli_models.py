"""CLI commands about models: train, eval, cycle, models, report, rollback, approve, reject, base.

Commands that learn import torch lazily, inside the command; the registry commands stay light.
"""

from __future__ import annotations

import argparse
import json
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any

from aftertune.daemon.cli_versions import metrics_table, register_version_commands, version_arg
from aftertune.daemon.interrupt import interrupt_flag
from aftertune.daemon.settings import Settings
from aftertune.daemon.tables import nats, percent, seconds, table
from aftertune.store.layout import StateLayout
from aftertune.store.records import printable


class CycleExit(IntEnum):
    """How `aftertune cycle` ends, for scripts and CI to branch on (1 and 2 are errors)."""

    PROMOTED = 0
    REJECTED = 3
    AWAITING_APPROVAL = 4
    NOTHING_TO_DO = 5


EXIT_CODES_HELP = """exit codes:
  0  success; `cycle`: the challenger was promoted
  1  an error (the message says what to do)
  2  invalid usage or setting
  3  `cycle`: the challenger was rejected
  4  `cycle`: a version awaits approval (`aftertune approve N` or `reject N`)
  5  `cycle`: nothing to do (no new train examples)
  130  interrupted (Ctrl-C)"""


def register_model_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the model commands to the top-level subparsers."""
    register_version_commands(sub, common)
    for add in (
        _add_train,
        _add_eval,
        _add_base,
        _add_cycle,
        _add_export,
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
        description="Train a LoRA adapter on the champion (or the base) with the train "
        "examples stored since the champion was made, plus replay and EWC, and register it "
        "as a candidate; nothing is judged or published. Use it to look at a training run "
        "alone (loss, steps, speed), then `aftertune eval --candidate N` to score it; the "
        "next `aftertune cycle` judges this candidate instead of training another. Exit 1 "
        "when there are no new train examples.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_train)


def _add_eval(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="score the champion (and a candidate) on held-out data",
        description="Score the champion (the base model when there is none) on each task's "
        "held-out examples as the gate does: the task's metric (accuracy, or token F1 for "
        "free text), NLL and how many examples. With --candidate N, score that version too, "
        "side by side. Use it to see how well the served model does now, or how a version "
        "from `aftertune train` compares, without deciding anything.",
    )
    p.add_argument(
        "--candidate",
        type=version_arg,
        default=None,
        metavar="VERSION",
        help="also score it (3 or v3)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval)


def _add_base(sub: Any, common: argparse.ArgumentParser) -> None:
    base = sub.add_parser(
        "base",
        parents=[common],
        help="the embedded base model",
        description="The embedded tiny base (model.base = embedded:tiny), a byte-level "
        "model shipped with aftertune for demos and tests.",
    )
    base_sub = base.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    p = base_sub.add_parser(
        "build",
        parents=[common],
        help="pretrain the embedded tiny base from scratch (reproduces the shipped weights)",
        description="Pretrain the embedded tiny base from scratch into DIR and print its "
        "build report. With the default steps, seed and threads on CPU it reproduces the "
        "shipped weights; use it to check them, or with --steps/--seed to build a variant.",
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
        description="Train (or resume) a challenger, evaluate champion and challenger, gate, "
        "decide; a promotion exports, parity-checks and publishes the bundle. Use it to run "
        "one cycle now, by hand or from a script or CI, without the daemon: the exit code "
        "says what was decided. It needs the examples stored first (`aftertune serve` or "
        "`serve --burst` ingests what `push` sent).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cycle)


def _add_export(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="export any registered version (candidate or champion) into a verified bundle, "
        "without promoting or publishing it",
        description="Merge the version's adapter chain into the base, export it to ONNX as a "
        "promotion would ([export] settings: genai builder, torch.onnx fallback), check "
        "parity against PyTorch on the regression prompts and write the manifest into DIR. "
        "Nothing is promoted or published; `aftertune generate --bundle DIR` answers with it. "
        "Use it to try or ship a version the gate did not promote, or at another precision.",
    )
    p.add_argument("version", type=version_arg, help="a registered version in any state (3 or v3)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new directory")
    p.add_argument(
        "--precision", choices=["fp32", "int8", "int4"], default=None, help="default: [export]"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_export)


def _add_rollback(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "rollback",
        parents=[common],
        help="make a retired former champion the champion again and republish its bundle",
        description="Move the champion back to VERSION, a retired former champion; the "
        "current champion is retired. Its bundle becomes latest again (exported anew if it "
        "was pruned) and a promotion event is sent, so consumers that follow it switch back. "
        "Use it when the newest champion misbehaves in production; --why goes to the audit "
        "log.",
    )
    p.add_argument("version", type=version_arg, help="version to roll back to (3 or v3)")
    p.add_argument("--why", default="", help="reason, kept in the audit log")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rollback)


def _add_approve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "approve",
        parents=[common],
        help="export, promote and publish a version awaiting approval",
        description="With gate.require_approval, a challenger that passes the gate waits "
        "for a person (`aftertune cycle` exits 4 and no further cycle runs). Approve it: it "
        "is exported and parity-checked, promoted to champion and published as a gate pass "
        "would be. Use `aftertune models show N` first to read its checks. With --override, "
        "overrule the gate: a version it rejected (trained on the current champion) is "
        "promoted the same way, its quarantined records are released, and the audit log "
        "keeps who did it and the --reason given.",
    )
    p.add_argument("version", type=version_arg, help="3 or v3")
    p.add_argument(
        "--why",
        "--reason",
        dest="why",
        default=None,
        help="reason, kept in the audit log (required with --override)",
    )
    p.add_argument(
        "--override",
        action="store_true",
        help="promote a version the gate rejected (the operator overrules the gate)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_approve)


def _add_reject(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "reject",
        parents=[common],
        help="reject a version awaiting approval",
        description="Reject a version that awaits approval (gate.require_approval): the "
        "records it was trained on are quarantined, as after a rejection by the gate, so no "
        "later cycle learns them, and cycles go on. --why is required and kept in the audit "
        "log.",
    )
    p.add_argument("version", type=version_arg, help="3 or v3")
    p.add_argument("--why", required=True, help="reason, kept in the audit log")
    p.add_argument("--json", action="store_true", help="machine-readable output")
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
    print(f"  adapted: {_adapted(report.adapted_modules)}")
    return 0


def _adapted(modules: dict[str, int]) -> str:
    """``{"qkv_proj": 32, "o_proj": 32}`` -> ``"o_proj x32, qkv_proj x32"``."""
    return ", ".join(f"{name} x{count}" for name, count in sorted(modules.items())) or "none"


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
            continue
        rows = [
            [
                task,
                _primary(score),
                percent(score.get(_primary(score))),
                nats(score["nll"]),
                score["n"],
            ]
            for task, score in scores.items()
            if "refused" not in score
        ]
        print(table(["task", "metric", "score", "NLL", "held-out n"], rows, indent=2))
        for score in scores.values():
            if "refused" in score:
                print(f"  not scored: {score['refused']}")
    return 0


def _primary(scores: dict[str, Any]) -> str:
    return "accuracy" if "accuracy" in scores else "token_f1"


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
    from aftertune.daemon.running_cycle import running_cycle
    from aftertune.learners.errors import (
        CycleBlocked,
        DataRejected,
        NothingToTrain,
        TrainingInterrupted,
    )

    try:
        # `aftertune status` in another shell shows this cycle, its phase and start time.
        # Ctrl-C raises KeyboardInterrupt; should an interrupt be swallowed on its way (in a
        # finalizer, a callback from C), training still stops at its next step.
        with (
            interrupt_flag() as interrupted,
            running_cycle(settings.state_dir, "aftertune cycle") as progress,
        ):

            def should_stop(step: int, total_steps: int) -> bool:
                return progress(step, total_steps) or interrupted.seen

            result = run_cycle_once(settings, actor=_actor(), should_stop=should_stop)
    except TrainingInterrupted as exc:
        if not interrupted.seen:
            raise
        print(f"aftertune: interrupted: {exc}", file=sys.stderr)
        return 130  # as a shell reports SIGINT, and as a KeyboardInterrupt ends it
    except DataRejected as exc:  # no version: the data checks rejected it before training
        return _no_cycle(args, "rejected", exc.reasons, CycleExit.REJECTED)
    except NothingToTrain as exc:
        return _no_cycle(args, "nothing_to_do", [str(exc)], CycleExit.NOTHING_TO_DO)
    except CycleBlocked as exc:
        return _no_cycle(args, "awaiting_approval", [str(exc)], CycleExit.AWAITING_APPROVAL)
    finally:  # also a bundle this run repaired as latest before it stopped
        _announce(settings)
    code = CycleExit[result.decision.name]
    if args.json:
        print(json.dumps({**result.to_json(), "exit_code": int(code)}, indent=2))
        return code
    print(f"v{result.version}: {result.decision.value}")
    if result.trained is not None:
        print(f"  adapted: {_adapted(result.trained.get('adapted_modules', {}))}")
    if result.bundle is not None:
        print(f"  published {result.bundle.path} (manifest sha256 {result.bundle.manifest_sha256})")
    for reason in result.reasons:
        print(f"  - {printable(reason)}")
    print(metrics_table(result.metrics))
    timings = ", ".join(f"{k.removesuffix('_s')} {seconds(v)}" for k, v in result.timings.items())
    if timings:
        print(f"  time: {timings}")
    return code


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import export_to

    result = export_to(settings, args.version, args.out, args.precision)
    manifest = result.manifest
    summary = {
        "version": manifest["version"],
        "path": str(result.bundle_dir),
        "format": manifest["format"],
        "precision": manifest["precision"],
        "parity": manifest["parity"],
        "export": manifest["export"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    parity = manifest["parity"]
    print(
        f"v{summary['version']} exported to {summary['path']} ({summary['format']}, "
        f"{summary['precision']}): {parity['identical']}/{parity['prompts']} parity prompts "
        "answered as PyTorch does"
    )
    # Only the generative kind has a fallback exporter; a ranking manifest has no such key.
    fallback = manifest["export"].get("fallback_reason")
    if fallback:
        print(f"  fell back to torch.onnx: {printable(fallback)}")
    return 0


def _no_cycle(args: argparse.Namespace, outcome: str, why: list[str], code: CycleExit) -> int:
    if args.json:
        print(json.dumps({"decision": outcome, "reasons": why, "exit_code": int(code)}))
    elif outcome == "rejected":
        print("rejected before training (records quarantined; `aftertune quarantine list`):")
        for reason in why:
            print(f"  - {printable(reason)}")
    else:
        print(f"no cycle: {printable('; '.join(why))}")
    return code


def _announce(settings: Settings) -> None:
    """Send the promotion event of ``latest`` unless the stream's newest event names it.

    If Redis is unreachable the daemon sends it when it starts.
    """
    import redis

    from aftertune.daemon.announce import announce_latest
    from aftertune.daemon.embedded_redis import redis_connection

    bundles = StateLayout(settings.state_dir).bundles
    if not bundles.is_dir():
        return
    try:
        with redis_connection(settings.redis.url, settings.state_dir) as client:
            announce_latest(client, settings)
    except (redis.RedisError, OSError) as exc:
        print(
            f"warning: the promotion event of the latest bundle was not sent ({exc}); "
            "the daemon sends it when it starts",
            file=sys.stderr,
        )


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import rollback

    bundle = rollback(settings, args.version, actor=_actor(), why=args.why)
    if bundle is not None:
        _announce(settings)
    if args.json:
        return _print_decision(args.version, "promoted", bundle)
    print(f"v{args.version} is the champion again")
    if bundle is not None:
        print(f"  {bundle.path} is latest again")
    return 0


def _print_decision(version: int, state: str, bundle: Any) -> int:
    """``approve``/``reject``/``rollback --json``: the version, its state, its bundle."""
    path = None if bundle is None else str(bundle.path)
    print(json.dumps({"version": version, "state": state, "bundle": path}))
    return 0


def _refused(message: str) -> None:
    from aftertune.daemon.errors import DaemonError

    raise DaemonError(message)


def _awaiting(registry: Any, version: int, verb: str) -> Any:
    """The version, refused unless it awaits a human decision."""
    from aftertune.store.registry import VersionState

    found = registry.get(version)
    if found.state is not VersionState.AWAITING_APPROVAL:
        hint = ""
        if verb == "approve" and found.state is VersionState.REJECTED:
            hint = " (to overrule the gate: `aftertune approve N --override --reason TEXT`)"
        _refused(
            f"v{version} is {found.state.value}, not awaiting approval; nothing to {verb}{hint}"
        )
    return found


def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    from aftertune.daemon.learning import approve
    from aftertune.store.registry import Registry

    if args.override:
        if not (args.why or "").strip():
            _refused(
                "--override needs --reason TEXT: the audit log keeps why the gate was overruled"
            )
    else:
        with Registry(settings.state_dir, settings.store.url) as registry:
            _awaiting(registry, args.version, "approve")
    why = args.why or "approved by hand"
    bundle = approve(settings, args.version, actor=_actor(), why=why, override=args.override)
    if bundle is not None:
        _announce(settings)
    if args.json:
        return _print_decision(args.version, "promoted", bundle)
    done = "promoted over the gate's rejection" if args.override else "approved and promoted"
    print(f"v{args.version} {done} to champion")
    if bundle is not None:
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
    if args.json:
        return _print_decision(args.version, "rejected", None)
    print(f"v{args.version} rejected")
    return 0
