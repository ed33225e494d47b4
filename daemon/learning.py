"""The learning commands: one cycle, train, eval, approve, rollback, recover publication.

Imports torch (through learners): only the commands that learn load this module. The
settings → specs mapping is ``aftertune.daemon.specs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from aftertune.daemon.settings import Settings
from aftertune.daemon.specs import specs_from
from aftertune.learners.candidate import CandidateReport
from aftertune.learners.cycle import CycleResult
from aftertune.learners.errors import LearnerError
from aftertune.learners.evaluate import TaskScore, score_dict
from aftertune.learners.export import ExportResult
from aftertune.learners.specs import LearningSpecs
from aftertune.learners.workspace import Workspace
from aftertune.store.bundles import Published
from aftertune.store.examples import ExampleStore
from aftertune.store.files import staged_dir
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry, Version, VersionState


@contextmanager
def workspace(
    settings: Settings, actor: str = "daemon", specs: LearningSpecs | None = None
) -> Iterator[Workspace]:
    """The learning workspace of ``settings`` (its store and registry open meanwhile)."""
    with (
        ExampleStore.in_state_dir(settings.state_dir, settings.store.url) as store,
        Registry(settings.state_dir, settings.store.url) as registry,
    ):
        yield Workspace(
            store, registry, settings.state_dir, specs or specs_from(settings), actor=actor
        )


# The trainer's state another daemon needs to take over training (docs/scaling.md): the
# online EWC Fisher. Kept in the registry's database (PostgreSQL); a no-op on SQLite.
FISHER_STATE = "ewc/fisher.safetensors"


def run_cycle_once(
    settings: Settings, actor: str, should_stop: Callable[[int, int], bool] | None = None
) -> CycleResult:
    fisher = StateLayout(settings.state_dir).fisher
    with workspace(settings, actor) as ws:
        registry = ws.state.registry
        registry.restore_state_file(FISHER_STATE, fisher)  # the last trainer's, if newer
        try:
            return ws.cycle(should_stop)
        finally:
            registry.keep_state_file(FISHER_STATE, fisher)


def approve(
    settings: Settings, version: int, actor: str, why: str, *, override: bool = False
) -> Published | None:
    """Promote a version awaiting approval: export + parity first, as a gate pass does. With
    ``override``, a version the gate rejected: its quarantined records are released too
    (it learned them), and the audit log keeps who overruled the gate and why."""
    with workspace(settings, actor) as ws:
        registry = ws.state.registry
        found = registry.get(version)
        wanted = VersionState.REJECTED if override else VersionState.AWAITING_APPROVAL
        if found.state is not wanted:
            hint = (
                "only a rejected version can be overruled"
                if override
                else "a rejected one needs `--override --reason TEXT`"
            )
            raise LearnerError(f"v{version} is {found.state.value}, not {wanted.value}: {hint}")
        if override:
            _check_overrulable(registry, found)
        bundle = ws.promote(
            found, reason=why or "approved", gate=found.gate or None, override=override
        )
        if override:
            ws.state.store.release(version=version, renew=False)  # v{version} learned them
        return bundle


def _check_overrulable(registry: Registry, found: Version) -> None:
    champion = registry.champion()
    now = champion.version if champion is not None else None
    if found.parent != now:
        raise LearnerError(
            f"v{found.version} was trained on v{found.parent or 0}, but the champion is "
            f"v{now or 0}: promoting it would drop what the champions since learned; release "
            f"its records instead (`aftertune quarantine release --version {found.version}`)"
        )


def rollback(settings: Settings, version: int, actor: str, why: str) -> Published | None:
    """Move the champion back to ``version`` and republish its bundle as latest."""
    with Registry(settings.state_dir, settings.store.url) as registry:
        registry.rollback(version, actor=actor, reason=why)
    return recover_publication(settings)


def export_to(
    settings: Settings, version: int, out: Path, precision: str | None = None
) -> ExportResult:
    """Export any registered ``version`` into the new directory ``out`` as a verified bundle,
    without promoting or publishing it (``export.enabled`` does not apply: it was asked for)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LearnerError(f"{out} already exists and is not empty; export into a new directory")
    specs = specs_from(
        settings.model_copy(update={"export": _export_settings(settings, precision)})
    )
    if specs.export is None:  # enabled above; keeps the type checker honest
        raise LearnerError("export settings did not produce an export spec")
    with workspace(settings, specs=specs) as ws:
        found = ws.state.registry.get(version)
        with staged_dir(out) as staging:
            return replace(ws.export(found, staging), bundle_dir=out)


def _export_settings(settings: Settings, precision: str | None) -> Any:
    changes: dict[str, Any] = {"enabled": True}
    if precision is not None:
        changes["precision"] = precision
    return replace(settings.export, **changes)


def run_train(settings: Settings, actor: str) -> CandidateReport:
    with workspace(settings, actor) as ws:
        return ws.train()


def run_eval(settings: Settings, candidate: int | None) -> dict[str, Any]:
    """{"<task>": {...}} for the champion; with a candidate {"champion": ..., "candidate": ...}.

    Scored as the gate scores: the same held-out cap per task, label sets and spec.
    """
    with workspace(settings) as ws:

        def scores(version: Version | None) -> dict[str, Any]:
            found, refused = ws.evaluate(version)
            return {**_as_json(found), **{t: {"refused": why} for t, why in refused.items()}}

        registry = ws.state.registry
        champion = scores(registry.champion())
        if candidate is None:
            return champion
        return {"champion": champion, "candidate": scores(registry.get(candidate))}


def _as_json(scores: dict[str, TaskScore]) -> dict[str, Any]:
    return {task: score_dict(s) for task, s in scores.items()}


def recover_publication(settings: Settings) -> Published | None:
    """Point latest at the champion's bundle (exported again if missing) and drop what an
    interrupted export left. Returns the bundle when latest moved. At start, after rollback."""
    if not settings.export.enabled:
        return None
    with workspace(settings) as ws:
        return ws.sync_latest()


def interrupted_versions(settings: Settings) -> list[int]:
    """Versions a crash left between training and a decision (the next cycle resumes them)."""
    with Registry(settings.state_dir, settings.store.url) as registry:
        return [
            v.version
            for state in (VersionState.CANDIDATE, VersionState.EVALUATING)
            for v in registry.in_state(state)
        ]
