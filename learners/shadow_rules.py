"""The gate's rule on live traffic: how much shadow evidence a challenger needs, and the
verdict on what arrived. Pure logic, no torch; the ``[gate]`` settings inherit the options.

The figure judged is the challenger's agreement *with feedback* once at least
``shadow_min_feedback`` feedback was given on answers it shadowed (feedback says which
answer was right, so it outranks the champion's answer), else its agreement *with the
champion*. A challenger passes once ``shadow_requests`` records were compared and that
figure is at least ``min_shadow_agreement``; it fails when they were and the figure is
lower. Waiting longer than ``shadow_timeout_s`` for them leaves the decision to a person
(``aftertune approve N`` / ``reject N``): a lack of traffic says nothing against the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from aftertune.learners.spec_config import SPEC_CONFIG
from aftertune.store.shadow import ShadowTally

WEEK_S = 7 * 24 * 3600.0
YEAR_S = 365 * 24 * 3600.0


@pydantic_dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class ShadowOptions:
    """``[gate]``'s shadow evaluation (``aftertune answer-server --shadow``)."""

    shadow_requests: int = Field(
        default=0,
        ge=0,
        le=10**9,
        description="live records answered by both models a challenger that passed the held-out"
        " checks needs before promotion; 0: no shadow evaluation",
    )
    min_shadow_agreement: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="share of them that must agree (with feedback, or else with the champion)",
    )
    shadow_min_feedback: int = Field(
        default=20,
        ge=1,
        le=10**9,
        description="from this much feedback on shadowed answers, agreement with feedback is"
        " judged instead of agreement with the champion",
    )
    shadow_timeout_s: float = Field(
        default=WEEK_S,
        gt=0,
        le=YEAR_S,
        description="no verdict after this long: left for `aftertune approve N` or `reject N`",
    )


class ShadowStatus(str, Enum):
    WAITING = "waiting"  # not enough comparisons yet
    PASSED = "passed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # left for a person


@dataclass(frozen=True)
class ShadowVerdict:
    status: ShadowStatus
    reason: str
    judged_on: str | None = None  # "feedback" or "champion"
    share: float | None = None  # the agreement judged


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def describe(tally: ShadowTally) -> str:
    """'412 of 500 shadowed answers agree with the champion (82.4%); 30 of 37 feedback (81.1%)'."""
    text = f"{tally.agreed} of {tally.compared} shadowed answers agree with the champion"
    if tally.champion_share is not None:
        text += f" ({_pct(tally.champion_share)})"
    text += f"; {tally.feedback_agreed} of {tally.feedback} feedback agrees with the challenger"
    if tally.feedback_share is not None:
        text += f" ({_pct(tally.feedback_share)})"
    return text + f", from {tally.servers} answer servers"


def shadow_verdict(tally: ShadowTally, rules: ShadowOptions, waited_s: float) -> ShadowVerdict:
    """The verdict on ``tally`` after ``waited_s`` seconds of shadow evaluation."""
    if rules.shadow_requests == 0:
        return ShadowVerdict(
            ShadowStatus.PASSED, "shadow evaluation is off now (gate.shadow_requests = 0)"
        )
    live = f"live traffic: {describe(tally)}"
    if tally.compared < rules.shadow_requests:
        needed = f"{rules.shadow_requests} are needed (gate.shadow_requests)"
        if waited_s >= rules.shadow_timeout_s:
            return ShadowVerdict(
                ShadowStatus.TIMED_OUT,
                f"{live}; {needed}, and fewer came within {waited_s:.0f} s (gate.shadow_timeout_s): "
                "left for `aftertune approve N` or `aftertune reject N`",
            )
        return ShadowVerdict(ShadowStatus.WAITING, f"{live}; {needed}")
    if tally.feedback >= rules.shadow_min_feedback and tally.feedback_share is not None:
        judged_on, share = "feedback", tally.feedback_share
    else:
        judged_on, share = "champion", tally.champion_share or 0.0
    ok = share >= rules.min_shadow_agreement - 1e-12
    return ShadowVerdict(
        ShadowStatus.PASSED if ok else ShadowStatus.FAILED,
        f"{live}; judged on agreement with the {judged_on}: {_pct(share)} "
        f"{'meets' if ok else 'is under'} the {_pct(rules.min_shadow_agreement)} needed "
        "(gate.min_shadow_agreement)",
        judged_on,
        share,
    )
