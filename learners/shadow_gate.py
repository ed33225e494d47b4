"""Shadow evaluation in the gate: a challenger that passed the held-out checks waits for
live traffic before promotion (``gate.shadow_requests`` > 0).

``begin_shadow``: instead of promoting, the challenger's bundle is exported and installed as
``bundles/vN`` (parity-checked, its manifest sha256 recorded in the registry, not
``latest``), and the version waits, state ``awaiting_approval``, with a ``shadow`` section in
its gate report. The daemon announces it on ``GET /v1/models/candidate``; answer servers
with ``--shadow`` run it on a sample of their traffic and report (``store/shadow.py``).

``settle_shadow``: the daemon's tally of those reports judged (``shadow_rules.py``) and
acted on. Passed: promoted and published with the bundle already exported (or, with
``gate.require_approval``, left for a person with the figures). Failed: rejected and its
training records quarantined, as ``aftertune reject`` does. Waiting or timed out: the
figures are written to the gate report, which ``aftertune models show N`` prints beside the
held-out checks. ``aftertune approve N`` and ``reject N`` decide at any time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aftertune.learners.errors import ExportError
from aftertune.learners.gate import Decision, GateReport
from aftertune.learners.learning_state import LearningState
from aftertune.learners.promote import promote_and_publish, stage_bundle
from aftertune.learners.shadow_rules import ShadowStatus, ShadowVerdict, shadow_verdict
from aftertune.store.bundles import Published
from aftertune.store.registry import Version, VersionState
from aftertune.store.shadow import ShadowTally

log = logging.getLogger(__name__)

SHADOW = "shadow"  # the gate report's section


def shadow_wanted(state: LearningState) -> bool:
    """Shadow evaluation is on, and there is a bundle to shadow (export enabled)."""
    return state.specs.rules.shadow_requests > 0 and state.specs.export is not None


def begin_shadow(
    state: LearningState, challenger: Version, gate: GateReport
) -> tuple[Decision, list[str], Published | None]:
    """Export ``challenger``'s bundle and leave it in shadow evaluation; a failed export
    rejects it, as at promotion."""
    registry, rules = state.registry, state.specs.rules
    try:
        stage_bundle(state, challenger)
    except ExportError as exc:
        why = f"export: {exc}"
        registry.transition(
            challenger.version,
            VersionState.REJECTED,
            actor=state.actor,
            reason=why,
            gate=gate.to_json(),
        )
        return Decision.REJECTED, [why], None
    waiting = shadow_verdict(ShadowTally(), rules, 0.0)
    section: dict[str, Any] = {
        "status": waiting.status.value,
        "since": time.time(),
        "then": "approval" if gate.decision is Decision.AWAITING_APPROVAL else "promote",
        "tally": ShadowTally().to_json(),
        "reason": waiting.reason,
    }
    reason = (
        f"passed the held-out checks; in shadow evaluation on live traffic until "
        f"{rules.shadow_requests} records were compared (gate.shadow_requests)"
    )
    registry.transition(
        challenger.version,
        VersionState.AWAITING_APPROVAL,
        actor=state.actor,
        reason=reason,
        gate={**gate.to_json(), SHADOW: section},
    )
    log.info("v%d: %s", challenger.version, reason)
    return Decision.AWAITING_APPROVAL, [*gate.reasons, reason], None


def settle_shadow(
    state: LearningState, version: Version, tally: ShadowTally, now: float | None = None
) -> tuple[ShadowVerdict, Published | None]:
    """Judge ``tally`` for ``version`` (in shadow evaluation) and act on the verdict."""
    section = dict(version.gate[SHADOW])
    waited = (time.time() if now is None else now) - float(section.get("since", 0.0))
    verdict = shadow_verdict(tally, state.specs.rules, waited)
    if section.get("status") != ShadowStatus.WAITING.value:
        # Decided already (passed, left for approval; timed out): the figures stay current.
        verdict = ShadowVerdict(ShadowStatus(section["status"]), section.get("reason", ""))
    else:
        section.update(status=verdict.status.value, reason=verdict.reason)
        section.update(judged_on=verdict.judged_on, share=verdict.share)
    section["tally"] = tally.to_json()
    report = {**version.gate, SHADOW: section}
    if section != version.gate[SHADOW]:
        log.info("v%d shadow evaluation: %s", version.version, verdict.reason)
    if verdict.status is ShadowStatus.PASSED and section.get("then") == "promote":
        return verdict, _promote(state, version, verdict, report)
    if verdict.status is ShadowStatus.FAILED:
        _reject(state, version, verdict, report)
        return verdict, None
    if verdict.status is ShadowStatus.TIMED_OUT and version.gate[SHADOW].get("status") == "waiting":
        log.warning("v%d shadow evaluation timed out: %s", version.version, verdict.reason)
    state.registry.set_gate(version.version, report)
    return verdict, None


def _promote(
    state: LearningState, version: Version, verdict: ShadowVerdict, report: dict[str, Any]
) -> Published | None:
    reasons = [*report.get("reasons", []), verdict.reason]
    try:
        return promote_and_publish(
            state, version, reason="; ".join(reasons), gate={**report, "reasons": reasons}
        )
    except ExportError as exc:  # the shadowed bundle went missing and could not be remade
        log.error("v%d passed shadow evaluation but was rejected: export: %s", version.version, exc)
        return None


def _reject(
    state: LearningState, version: Version, verdict: ShadowVerdict, report: dict[str, Any]
) -> None:
    """Rejected on live traffic: its training records set aside first (as ``aftertune
    reject`` does), so a crash in between ends the same way."""
    seq_range = version.lineage.get("trained_on", {}).get("seq_range")
    if seq_range:
        state.store.quarantine(
            int(seq_range[0]), int(seq_range[1]), version.version, reason=verdict.reason
        )
    reasons = [*report.get("reasons", []), verdict.reason]
    state.registry.transition(
        version.version,
        VersionState.REJECTED,
        actor=state.actor,
        reason=verdict.reason,
        gate={**report, "decision": Decision.REJECTED.value, "reasons": reasons},
    )
    log.warning("v%d rejected on live traffic: %s", version.version, verdict.reason)
