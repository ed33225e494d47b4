"""Promotion and publication as one step to the outside world.

Order, chosen so that a crash anywhere leaves nothing half-visible:

1. export the challenger into ``bundles/.staging-vN-*`` and check parity against PyTorch
   (failure → the challenger is rejected with that reason, the champion never moves);
2. rename the staging dir to ``bundles/vN`` (whole, verified, not yet ``latest``);
3. promote in the registry (one SQLite transaction moves the ``champion`` alias);
4. swap the ``latest`` symlink to ``vN``.

``sync_latest`` repairs a crash between 3 and 4 (or a rollback): it points ``latest`` at the
champion's bundle, exporting it again when it was pruned, never made, or damaged (taken out
of service by ``store/bundle_audit.py``, or a file missing or of the wrong size).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from aftertune.learners.champion import build_champion
from aftertune.learners.errors import ExportError
from aftertune.learners.export import ExportResult
from aftertune.learners.learning_state import LearningState
from aftertune.learners.lineage import manifest_lineage
from aftertune.store.bundles import (
    Published,
    clean_staging,
    install,
    latest_version,
    new_staging_dir,
    prune,
    published,
    set_latest,
)
from aftertune.store.consumer.format import (
    MANIFEST,
    manifest_sha256,
    read_manifest,
    resolve_inside,
    verify_bundle,
    version_dir_name,
)
from aftertune.store.errors import BundleError
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.failpoints import failpoint
from aftertune.store.progress import ticking
from aftertune.store.prompt import PromptTemplate
from aftertune.store.registry import Version, VersionState

log = logging.getLogger(__name__)

BUNDLE_NAME = "aftertune"


def parity_prompts(
    store: ExampleStore, until: int, limit: int, template: PromptTemplate
) -> list[tuple[str, str]]:
    """Regression (task, prompt) pairs: held-out records up to ``until``, round-robin over
    tasks."""
    by_task: dict[str, list[Example]] = {}
    for ex in store.held_out(until=until):
        by_task.setdefault(ex.task, []).append(ex)
    out: list[tuple[str, str]] = []
    queues = [iter(v) for _, v in sorted(by_task.items())]
    while queues and len(out) < limit:
        for it in list(queues):
            ex = next(it, None)
            if ex is None:
                queues.remove(it)
            elif len(out) < limit:
                out.append((ex.task, template.render(ex.instruction, ex.input)))
    return out


def export_version(state: LearningState, version: Version, out: Path) -> ExportResult:
    """Export ``version`` (base + its adapter chain merged) into the empty directory ``out``:
    a parity-checked bundle with its manifest, published nowhere. ExportError: why not."""
    specs = state.specs
    spec, base = specs.export, specs.base
    if spec is None:
        raise ExportError("export is disabled (export.enabled = false)")
    chain = state.registry.chain(version.version)
    model_dir = build_champion(base, [v.adapter_dir for v in chain], state.layout.champions)
    fields: dict[str, Any] = {
        "name": BUNDLE_NAME,
        "version": version.version,
        **manifest_lineage(version),
        "metrics": version.metrics,
    }
    prompts = parity_prompts(state.store, version.data_seq, spec.parity_prompts, spec.template)
    adapter = chain[-1].adapter_dir if chain else None
    with ticking(f"export v{version.version} to ONNX and check parity"):
        result = state.kind.export(model_dir, out, specs, prompts, fields, adapter)
    parity = result.manifest["parity"]
    log.info(
        "v%d exported (%s, %s) in %.1fs; parity: %s",
        version.version,
        result.manifest["format"],
        result.manifest["precision"],
        result.seconds["export_s"],
        ", ".join(f"{k} {v}" for k, v in parity.items()),
        extra={"fields": {"version": version.version, "parity": parity}},
    )
    return result


def stage_bundle(state: LearningState, version: Version) -> Path:
    """Export ``version`` into ``bundles/vN``, unpublished, and record its manifest's sha256
    and this daemon as its publisher in the registry (what other daemons check a pull by).
    A bundle exported before (for shadow evaluation) that is whole and as recorded is kept."""
    ready = _staged(state, version)
    if ready is not None:
        return ready
    staging = new_staging_dir(state.layout.bundles, version.version)
    try:
        failpoint("export.staging")
        export_version(state, version, staging)
        final = install(staging, state.layout.bundles, version.version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    state.registry.record_publication(
        version.version, manifest_sha256(final), state.specs.publisher
    )
    return final


def _staged(state: LearningState, version: Version) -> Path | None:
    """``bundles/vN`` when every file verifies and its manifest is the one the registry
    recorded for ``version``; None when it must be exported (again)."""
    recorded = state.registry.publication(version.version)
    final = state.layout.bundles / version_dir_name(version.version)
    if recorded is None or not (final / MANIFEST).is_file():
        return None
    try:
        verify_bundle(final)
    except (BundleError, OSError):
        return None
    return final if manifest_sha256(final) == recorded.manifest_sha256 else None


def promote_and_publish(
    state: LearningState,
    version: Version,
    *,
    reason: str,
    gate: dict[str, Any] | None = None,
    override: bool = False,
) -> Published | None:
    """Export + parity, then promote, then publish. ExportError: rejected, champion kept.

    With ``specs.export=None`` (export disabled) it only promotes and returns None. With
    ``override`` the version is one the gate rejected, promoted by an operator
    (``Registry.overrule``: the audit log keeps who and why).
    """
    registry, specs, actor = state.registry, state.specs, state.actor
    spec = specs.export
    if spec is not None:
        try:
            stage_bundle(state, version)
        except ExportError as exc:
            if not override:  # an overruled version stays rejected, as it was
                registry.transition(
                    version.version,
                    VersionState.REJECTED,
                    actor=actor,
                    reason=f"export: {exc}",
                    gate=gate,
                )
            raise
    if override:
        registry.overrule(version.version, actor=actor, reason=reason, gate=gate)
    else:
        registry.promote(version.version, actor=actor, reason=reason, gate=gate)
    failpoint("publish.before_latest")
    if spec is None:
        return None
    return _point_latest(state, version.version)


def _point_latest(state: LearningState, version: int) -> Published:
    """``latest`` to ``version``, then the oldest bundles beyond ``export.keep`` pruned, never
    one the registry still needs (champion, promoted, awaiting approval, rollback target)."""
    root, keep = state.layout.bundles, state.specs.keep_bundles
    set_latest(root, version)
    removed = prune(root, keep, protect=state.registry.needed_versions())
    if removed:
        log.info("pruned bundles %s (export.keep = %d)", ", ".join(f"v{v}" for v in removed), keep)
    return published(root, version)


def sync_latest(state: LearningState) -> Published | None:
    """Make ``latest`` the champion's bundle (after a crash or a rollback). None: no champion.

    Returns the bundle when ``latest`` had to move, None when it already pointed right or
    export is disabled.
    """
    if state.specs.export is None:
        return None
    root = state.layout.bundles
    leftovers = clean_staging(root)
    if leftovers:
        log.info("removed what interrupted exports left: %s", ", ".join(leftovers))
    champion = state.registry.champion()
    if champion is None:
        return None
    whole = _looks_whole(root / version_dir_name(champion.version))
    if whole and state.registry.publication(champion.version) is None:
        # Promoted before the registry recorded publications (schema 3): recorded now.
        state.registry.record_publication(
            champion.version,
            manifest_sha256(root / version_dir_name(champion.version)),
            state.specs.publisher,
        )
    if whole and latest_version(root) == champion.version:
        return None
    if not whole:
        # Pruned, never made, or taken out of service (store/bundle_audit.py): made again
        # from the adapters, which are the source of truth.
        log.info("champion v%d has no whole bundle; exporting it again", champion.version)
        stage_bundle(state, champion)
    return _point_latest(state, champion.version)


def _looks_whole(bundle_dir: Path) -> bool:
    """A manifest that reads and every file it lists at its size: what can be checked without
    hashing (the daemon's bundle audit hashes, and takes a damaged bundle out of service)."""
    try:
        manifest = read_manifest(bundle_dir)
        return all(
            resolve_inside(bundle_dir, rel).stat().st_size == entry["bytes"]
            for rel, entry in manifest["files"].items()
        )
    except (BundleError, OSError):
        return False
