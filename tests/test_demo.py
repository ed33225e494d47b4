"""What `make run` shows a newcomer: the demo on real text by default, with a poisoned batch
that must start its own cycle and be caught, and the gate's figures for each promotion.

The demo's full run (three cycles of MiniLM) is timed in docs/benchmarks.md, not here."""

from __future__ import annotations

import json
from pathlib import Path

from aftertune.daemon.cli import build_parser
from aftertune.daemon.demo import REAL_POISON, REAL_TRAIN, _why, scenario
from aftertune.store.registry import Version, VersionState

REPO = Path(__file__).resolve().parent.parent


def test_make_run_learns_real_text_and_make_run_tiny_the_puzzles() -> None:
    assert build_parser().parse_args(["demo"]).base == "embedded:minilm"
    recipes = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "\nrun: $(STAMP)\n\t$(BIN)/aftertune demo\n" in recipes
    assert "\nrun-tiny: $(STAMP)\n\t$(BIN)/aftertune demo --base embedded:tiny\n" in recipes


def test_each_real_task_push_is_one_cycle_with_every_held_out_line() -> None:
    plan = scenario("embedded:minilm")
    threshold = int(plan.env["AFTERTUNE_CYCLE__MIN_NEW_EXAMPLES"])
    for _, tasks, poisoned in plan.steps:
        rows = plan.poison() if poisoned else [r for t in tasks for r in plan.rows(t)]
        train = [r for r in rows if r["split"] == "train"]
        # a cycle starts on the whole push: its train part reaches the threshold
        assert len(train) >= threshold
        if not poisoned:
            assert len(train) == REAL_TRAIN * len(tasks)
            assert len(rows) - len(train) == 100 * len(tasks)  # every shipped held-out line


def test_the_real_poison_flips_every_label_on_inputs_never_pushed() -> None:
    plan = scenario("embedded:minilm")
    pushed = {r["input"]: r["output"] for t in ("agnews", "sni_emotion") for r in plan.rows(t)}
    poison = plan.poison()
    assert len(poison) == REAL_POISON
    assert {r["task"] for r in poison} == {"agnews"}
    assert not {r["input"] for r in poison} & set(pushed)
    truth = {r["input"]: r["output"] for r in _shipped_agnews()}
    assert all(r["output"] != truth[r["input"]] for r in poison)


def _shipped_agnews() -> list[dict[str, str]]:
    path = REPO / "daemon" / "demo_data" / "real" / "agnews.train.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _version(state: VersionState, gate: dict[str, object]) -> Version:
    return Version(1, state, None, 0, 0.0, 0.0, Path("."), gate=gate)


def test_a_promotion_shows_the_gate_figures_and_a_rejection_its_reasons() -> None:
    chance = "agnews: accuracy 87.0% on 100 new held-out records beats chance: ... 35.4%"
    gate = {
        "reasons": ["all 2 checks passed"],
        "checks": [
            {"metric": "accuracy", "passed": True, "message": chance},
            {"metric": "nll", "passed": True, "message": "agnews: NLL ..."},
        ],
    }
    assert _why(_version(VersionState.PROMOTED, gate)) == [chance]
    assert _why(_version(VersionState.RETIRED, gate)) == [chance]  # promoted, then replaced
    rejected = {"reasons": ["agnews: accuracy ... fell by 16.0 points"], "checks": []}
    assert _why(_version(VersionState.REJECTED, rejected)) == rejected["reasons"]


def test_the_demo_says_which_defaults_it_departs_from_and_names_them_right() -> None:
    from aftertune.learners.kinds.ranking.kind import Ranking
    from aftertune.learners.training_specs import EwcSpec

    plan = scenario("embedded:minilm")
    assert plan.env["AFTERTUNE_TRAIN__EPOCHS"] == "1"
    assert f"train.epochs {Ranking.train_defaults['epochs']})" in plan.note
    assert f"Fisher on {plan.env['AFTERTUNE_EWC__FISHER_SAMPLES']} examples" in plan.note
    assert f"(default {EwcSpec().fisher_samples})" in plan.note
