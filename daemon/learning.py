"""Settings → the learners' plain specs, and the train / eval commands built on them.

Imports torch (through learners): only the commands that learn load this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aftertune.daemon.settings import Settings
from aftertune.learners.candidate import CandidateReport, evaluate_version, train_candidate
from aftertune.learners.cycle import CycleResult, EvalSpec, run_cycle
from aftertune.learners.errors import LearnerError
from aftertune.learners.evaluate import score_dict
from aftertune.learners.ewc import EwcSpec
from aftertune.learners.export import ExportSpec
from aftertune.learners.gate import GateRules, MetricRules
from aftertune.learners.lora import LoraSpec
from aftertune.learners.promote import promote_and_publish, sync_latest
from aftertune.learners.recipe import TrainSpec
from aftertune.learners.replay import ReplaySpec
from aftertune.store.bundles import Published
from aftertune.store.examples import ExampleStore
from aftertune.store.registry import Registry, VersionState


def lora_spec(settings: Settings) -> LoraSpec:
    s = settings.lora
    return LoraSpec(r=s.r, alpha=s.alpha, dropout=s.dropout, target_modules=tuple(s.target_modules))


def train_spec(settings: Settings) -> TrainSpec:
    s = settings.train
    return TrainSpec(
        lr=s.lr,
        weight_decay=s.weight_decay,
        warmup_steps=s.warmup_steps,
        max_steps=s.max_steps,
        epochs=s.epochs,
        batch_size=s.batch_size,
        grad_accum=s.grad_accum,
        max_grad_norm=s.max_grad_norm,
        seed=s.seed,
        max_length=s.max_length,
        checkpoint_every=s.checkpoint_every,
        device=s.device,
        progress=s.progress,
    )


def replay_spec(settings: Settings) -> ReplaySpec:
    s = settings.replay
    return ReplaySpec(ratio=s.ratio, cap=s.cap, enabled=s.enabled)


def ewc_spec(settings: Settings) -> EwcSpec:
    s = settings.ewc
    return EwcSpec(lam=s.lam, decay=s.decay, fisher_samples=s.fisher_samples, enabled=s.enabled)


def gate_rules(settings: Settings) -> GateRules:
    g = settings.gate
    return GateRules(
        default=MetricRules(floor=g.floor, max_drop=g.max_drop, max_drop_rel=g.max_drop_rel),
        per_task={
            task: MetricRules(floor=t.floor, max_drop=t.max_drop, max_drop_rel=t.max_drop_rel)
            for task, t in g.tasks.items()
        },
        min_gain=g.min_gain,
        min_nll_gain=g.min_nll_gain,
        noise_z=g.noise_z,
        max_nll_rise_same_task=g.max_nll_rise_same_task,
        max_conflict_share=g.max_conflict_share,
        require_approval=g.require_approval,
    )


def eval_spec(settings: Settings) -> EvalSpec:
    return EvalSpec(
        batch_size=settings.eval.batch_size,
        max_new_tokens=settings.eval.max_new_tokens,
        max_length=settings.train.max_length,
        max_per_task=settings.gate.max_per_task,
    )


def export_spec(settings: Settings) -> ExportSpec | None:
    """None when export is disabled (promotions then publish nothing)."""
    s = settings.export
    if not s.enabled:
        return None
    return ExportSpec(
        method=s.method,
        precision=s.precision,
        target=s.target,
        parity_prompts=s.parity_prompts,
        parity_max_new_tokens=s.parity_max_new_tokens,
        min_token_agreement=s.min_token_agreement,
        logits_atol=s.logits_atol,
    )


@contextmanager
def _state(settings: Settings) -> Iterator[tuple[ExampleStore, Registry]]:
    with (
        ExampleStore.in_state_dir(settings.state_dir) as store,
        Registry(settings.state_dir) as registry,
    ):
        yield store, registry


def _learning(settings: Settings) -> dict[str, Any]:
    """What training needs, as plain arguments (the learners never see Settings)."""
    return {
        "base": settings.model.base,
        "lora": lora_spec(settings),
        "train": train_spec(settings),
        "replay": replay_spec(settings),
        "ewc": ewc_spec(settings),
    }


def run_cycle_once(
    settings: Settings, actor: str, should_stop: Callable[[int, int], bool] | None = None
) -> CycleResult:
    with _state(settings) as (store, registry):
        return run_cycle(
            store,
            registry,
            settings.state_dir,
            **_learning(settings),
            rules=gate_rules(settings),
            eval_spec=eval_spec(settings),
            export=export_spec(settings),
            keep_bundles=settings.export.keep,
            actor=actor,
            should_stop=should_stop,
        )


def approve(settings: Settings, version: int, actor: str, why: str) -> Published | None:
    """Promote a version awaiting approval: export + parity first, as a gate pass does."""
    with _state(settings) as (store, registry):
        found = registry.get(version)
        if found.state is not VersionState.AWAITING_APPROVAL:
            raise LearnerError(
                f"v{version} is {found.state.value}, not awaiting approval; nothing to approve"
            )
        return promote_and_publish(
            store, registry, settings.state_dir, found, base=settings.model.base,
            spec=export_spec(settings), keep=settings.export.keep, actor=actor,
            reason=why or "approved", gate=found.gate or None,
        )  # fmt: skip


def rollback(settings: Settings, version: int, actor: str, why: str) -> Published | None:
    """Move the champion back to ``version`` and republish its bundle as latest."""
    with Registry(settings.state_dir) as registry:
        registry.rollback(version, actor=actor, reason=why)
    return recover_publication(settings)


def run_train(settings: Settings, actor: str) -> CandidateReport:
    with _state(settings) as (store, registry):
        return train_candidate(
            store, registry, settings.state_dir, **_learning(settings), actor=actor
        )


def run_eval(settings: Settings, candidate: int | None) -> dict[str, Any]:
    """{"<task>": {...}} for the champion; with a candidate {"champion": ..., "candidate": ...}."""
    with _state(settings) as (store, registry):
        kwargs = {
            "base": settings.model.base,
            "batch_size": settings.eval.batch_size,
            "max_new_tokens": settings.eval.max_new_tokens,
            "max_length": settings.train.max_length,
        }
        champion = evaluate_version(
            store, registry, settings.state_dir, version=registry.champion(), **kwargs
        )
        champion_json = {t: score_dict(s) for t, s in champion.items()}
        if candidate is None:
            return champion_json
        scores = evaluate_version(
            store, registry, settings.state_dir, version=registry.get(candidate), **kwargs
        )
        return {
            "champion": champion_json,
            "candidate": {t: score_dict(s) for t, s in scores.items()},
        }


def recover_publication(settings: Settings) -> Published | None:
    """Point latest at the champion's bundle (exported again if missing) and drop what an
    interrupted export left. Returns the bundle when latest moved. At start, after rollback."""
    spec = export_spec(settings)
    if spec is None:
        return None
    with _state(settings) as (store, registry):
        return sync_latest(
            store, registry, settings.state_dir, base=settings.model.base, spec=spec,
            keep=settings.export.keep,
        )  # fmt: skip


def interrupted_versions(settings: Settings) -> list[int]:
    """Versions a crash left between training and a decision (the next cycle resumes them)."""
    with Registry(settings.state_dir) as registry:
        return [
            v.version
            for state in (VersionState.CANDIDATE, VersionState.EVALUATING)
            for v in registry.in_state(state)
        ]
