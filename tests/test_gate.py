"""Gate rules: value and change thresholds, minimum gain, the edge cases."""

from __future__ import annotations

from spec_fixtures import gate_rules

from aftertune.learners.gate import Decision, MetricRules, Verdict, judge

RULES = gate_rules(
    default=MetricRules(
        max_drop={"accuracy": 0.05, "nll": 0.25}, max_drop_rel={"nll": 0.25}, floor={}
    ),
    min_gain=0.0,
    min_nll_gain=0.01,
    noise_z=0.0,
)
OLD = {"accuracy": 0.80, "nll": 1.0, "n": 50}


def test_equal_scores_pass_regression() -> None:
    report = judge({"a": (OLD, dict(OLD))}, {}, set(), RULES)
    assert report.decision is Decision.PROMOTED
    assert all(c.passed for c in report.checks) and report.checks


def test_drop_over_threshold_is_rejected_naming_task_metric_and_values() -> None:
    report = judge({"a": (OLD, {**OLD, "accuracy": 0.70})}, {}, set(), RULES)
    assert report.decision is Decision.REJECTED
    (failure,) = report.failures
    assert (failure.task, failure.metric, failure.rule) == ("a", "accuracy", "max_drop")
    assert failure.message == (
        "a: accuracy on earlier held-out records 80.0% -> 70.0%: fell by 10.0 points, more than"
        " the 5.0 points allowed (gate.max_drop)"
    )


def test_nll_rise_is_a_drop_and_checked_relatively() -> None:
    report = judge({"a": (OLD, {**OLD, "nll": 1.2})}, {}, set(), RULES)
    assert report.decision is Decision.PROMOTED  # +0.2 abs and +20 % rel: within
    report = judge({"a": (OLD, {**OLD, "nll": 1.3})}, {}, set(), RULES)
    assert {c.rule for c in report.failures} == {"max_drop", "max_drop_rel"}


def test_a_near_zero_nll_that_triples_is_not_a_regression_but_a_real_rise_still_is() -> None:
    """0.0002 -> 0.0006 nats is +163 % of itself, 2 % of the 0.02 nats a relative change is
    taken of; from the same start, 0.0002 -> 0.1 is rejected."""
    sure = {**OLD, "nll": 0.0002353}
    report = judge({"a": (sure, {**sure, "nll": 0.0006199})}, {}, set(), RULES)
    assert report.decision is Decision.PROMOTED, [c.message for c in report.failures]
    rel = next(c for c in report.checks if c.rule == "max_drop_rel")
    assert rel.message.endswith(
        "rose by 0.0003846 nats, within the 0.005 nats allowed (25% of 0.02 nats, the least it"
        " is taken of, gate.max_drop_rel)"
    )
    report = judge({"a": (sure, {**sure, "nll": 0.1})}, {}, set(), RULES)
    assert [c.rule for c in report.failures] == ["max_drop_rel"]


def test_missing_metric_on_the_challenger_fails() -> None:
    report = judge({"a": (OLD, {"nll": 1.0, "n": 50})}, {}, set(), RULES)
    assert report.decision is Decision.REJECTED
    assert report.failures[0].rule == "metric_present"


def test_new_data_task_without_held_out_examples_is_reported_not_passed() -> None:
    report = judge({}, {}, {"fresh"}, RULES)
    assert report.decision is Decision.REJECTED
    assert "fresh: no held-out examples" in report.reasons[0]


def test_new_task_without_champion_score_is_held_to_floors_only() -> None:
    low = {"accuracy": 0.30, "nll": 3.0, "n": 20}
    assert judge({}, {"fresh": (None, low)}, {"fresh"}, RULES).decision is Decision.PROMOTED
    floored = gate_rules(default=MetricRules(floor={"accuracy": 0.5}))
    report = judge({}, {"fresh": (None, low)}, {"fresh"}, floored)
    assert report.decision is Decision.REJECTED
    assert report.failures[0].rule == "value_floor"


def test_gain_on_new_data_is_required_for_known_tasks() -> None:
    same = judge({}, {"a": (OLD, dict(OLD))}, {"a"}, RULES)
    assert same.decision is Decision.REJECTED  # no NLL improvement
    assert same.failures[0].rule == "min_nll_gain"
    better = judge({}, {"a": (OLD, {**OLD, "accuracy": 0.9, "nll": 0.5})}, {"a"}, RULES)
    assert better.decision is Decision.PROMOTED


def test_per_task_override_and_approval_and_determinism() -> None:
    loose = gate_rules(
        default=RULES.default,
        per_task={"noisy": MetricRules(max_drop={"accuracy": 0.5})},
        require_approval=True,
    )
    inputs = ({"noisy": (OLD, {**OLD, "accuracy": 0.4})}, {}, set(), loose)
    report = judge(*inputs)
    assert report.decision is Decision.AWAITING_APPROVAL
    assert judge(*inputs).to_json() == report.to_json()


def test_small_held_out_sets_widen_the_allowed_drop_by_sampling_noise() -> None:
    noisy = gate_rules(default=RULES.default, noise_z=1.0)
    few = {"accuracy": 0.80, "nll": 1.0, "n": 20}  # one answer = 5 points
    report = judge({"a": (few, {**few, "accuracy": 0.72})}, {}, set(), noisy)
    assert report.decision is Decision.PROMOTED
    assert "the 8.9 points allowed (gate.max_drop 5.0 points, widened for the noise of 20" in (
        report.checks[0].message
    )
    poisoned = judge({"a": (few, {**few, "accuracy": 0.45})}, {}, set(), noisy)
    assert poisoned.decision is Decision.REJECTED
    many = {**few, "n": 5000}
    assert judge({"a": (many, {**many, "accuracy": 0.72})}, {}, set(), noisy).failures


def test_new_data_must_not_worsen_the_same_tasks_old_held_out() -> None:
    # A flipped batch "improves" on its own poisoned held-out part but raises the reference
    # NLL on the task's earlier held-out records: rejected, naming the task.
    regression = {"a": (OLD, {**OLD, "nll": 1.05})}
    gain = {"a": (OLD, {**OLD, "nll": 0.8})}
    report = judge(regression, gain, {"a"}, RULES)
    assert report.decision is Decision.REJECTED
    assert [c.rule for c in report.failures] == ["same_task_consistency"]
    assert report.reasons == [
        "a: its new records look mislabelled: learning them made its earlier held-out records"
        " worse (log-loss 1 nats -> 1.05 nats: rose by 0.05 nats) while its new held-out"
        " records, the batch's own, got better (log-loss 1 nats -> 0.8 nats: fell by 0.2 nats)",
        "a: with this task's new data, log-loss on earlier held-out records 1 nats -> 1.05 nats:"
        " rose by 0.05 nats, more than the 0.02 nats rise allowed: its new records look"
        " mislabelled (gate.max_nll_rise_same_task)",
    ]
    clean = judge({"a": (OLD, {**OLD, "nll": 0.95})}, gain, {"a"}, RULES)
    assert clean.decision is Decision.PROMOTED


def test_relabelled_copies_of_stored_inputs_are_rejected_whatever_the_metrics() -> None:
    good = {"a": (OLD, {**OLD, "nll": 0.9})}
    report = judge(good, good, {"a"}, RULES, conflicts={"a": (100, 48)})
    assert report.decision is Decision.REJECTED
    assert report.reasons == [
        "a: 48 of 100 new records (48.0%) give another answer to an input already stored, more"
        " than the 5% allowed (gate.max_conflict_share): the batch relabels stored data"
    ]
    fine = judge(good, good, {"a"}, RULES, conflicts={"a": (100, 2)})
    assert fine.decision is Decision.PROMOTED


def test_a_new_label_task_at_chance_is_rejected_and_one_that_learned_passes() -> None:
    """The Quick start's coin flip: 53 % on 100 held-out records, majority answer 51 %."""
    coin = {"accuracy": 0.53, "nll": 0.7, "n": 100}
    report = judge({}, {"sst2": (None, coin)}, {"sst2"}, RULES, chance={"sst2": (0.51, 100)})
    assert report.decision is Decision.REJECTED
    (failure,) = report.failures
    assert failure.rule == "chance" and "at chance level" in failure.message
    assert "51.0%" in failure.message and "59.2%" in failure.message  # 51 + 1.645 * 5.0
    learned = {**coin, "accuracy": 0.62}
    report = judge({}, {"sst2": (None, learned)}, {"sst2"}, RULES, chance={"sst2": (0.51, 100)})
    assert report.decision is Decision.PROMOTED and "beats chance" in report.checks[0].message


def test_the_chance_margin_shrinks_with_the_sample_and_can_be_switched_off() -> None:
    score = {"accuracy": 0.60, "nll": 0.7, "n": 0}
    for n, decision in ((40, Decision.REJECTED), (1000, Decision.PROMOTED)):
        report = judge({}, {"t": (None, score)}, {"t"}, RULES, chance={"t": (0.5, n)})
        assert report.decision is decision, n
    off = gate_rules(default=RULES.default, beat_chance=False)
    report = judge({}, {"t": (None, score)}, {"t"}, off, chance={"t": (0.5, 40)})
    assert report.decision is Decision.PROMOTED and not report.checks
    # A task the champion already has a score for is judged on its gain, not on chance.
    report = judge({}, {"t": (score, score)}, {"t"}, RULES, chance={"t": (0.5, 40)})
    assert "chance" not in {c.rule for c in report.checks}


def test_messages_say_which_way_a_metric_moved() -> None:
    """A rise in NLL is a rise, not a 'relative drop of 518 %'; an improvement says so."""
    report = judge({"a": (OLD, {**OLD, "nll": 6.182})}, {}, set(), RULES)
    messages = {c.rule: c.message for c in report.checks}
    assert messages["max_drop_rel"] == (
        "a: log-loss on earlier held-out records 1 nats -> 6.182 nats: rose by 5.182 nats, more"
        " than the 0.25 nats allowed (25% of the champion's 1 nats, gate.max_drop_rel)"
    )
    better = judge({"a": (OLD, {**OLD, "accuracy": 0.9, "nll": 0.9})}, {}, set(), RULES)
    texts = [c.message for c in better.checks]
    assert (
        "a: accuracy on earlier held-out records 80.0% -> 90.0%: rose by 10.0 points (an"
        " improvement)" in texts
    )
    assert (
        "a: log-loss on earlier held-out records 1 nats -> 0.9 nats: fell by 0.1 nats (an"
        " improvement)" in texts
    )
    assert not any("drop of -" in t for t in texts)


def test_a_metric_over_both_its_limits_is_one_reason() -> None:
    """Absolute and relative rise of the same NLL: said once, with both limits."""
    report = judge({"a": (OLD, {**OLD, "accuracy": 0.6, "nll": 6.182})}, {}, set(), RULES)
    assert {c.rule for c in report.failures} == {"max_drop", "max_drop_rel"}
    assert len(report.failures) == 3
    nll = [r for r in report.reasons if "log-loss" in r]
    assert report.reasons[0].startswith("a: accuracy on earlier held-out records 80.0% -> 60.0%")
    assert nll == [
        "a: log-loss on earlier held-out records 1 nats -> 6.182 nats: rose by 5.182 nats, more"
        " than the 0.25 nats allowed (gate.max_drop); also more than the 0.25 nats allowed (25%"
        " of the champion's 1 nats, gate.max_drop_rel)"
    ]


def test_too_few_or_one_answer_held_out_records_say_what_would_pass() -> None:
    """A threshold over 100 % cannot be met: the reason says what is needed instead."""
    perfect = {"accuracy": 1.0, "nll": 0.1, "n": 0}
    one = judge({}, {"t": (None, perfect)}, {"t"}, RULES, chance={"t": (1.0, 7)})
    assert one.decision is Decision.REJECTED
    assert one.reasons == [
        "t: accuracy 100.0% on 7 new held-out records cannot beat chance: they all have the "
        "same answer, so a model that always gives it scores as well; held-out records with "
        "other answers are needed"
    ]
    few = judge({}, {"t": (None, perfect)}, {"t"}, RULES, chance={"t": (0.5, 2)})
    assert few.decision is Decision.REJECTED
    assert "needs more held-out records than 2" in few.reasons[0]
    assert all(c.waits_for_data for c in one.failures + few.failures)  # not quarantined
    enough = judge({}, {"t": (None, perfect)}, {"t"}, RULES, chance={"t": (0.5, 4)})
    assert enough.decision is Decision.PROMOTED
    coin = judge(
        {}, {"t": (None, {**perfect, "accuracy": 0.5})}, {"t"}, RULES, chance={"t": (0.5, 100)}
    )
    assert coin.failures and not coin.failures[0].waits_for_data  # a verdict: quarantined


def test_verdicts_are_per_task_and_an_unexplained_regression_is_the_windows() -> None:
    """A flipped known task is rejected by itself; a clean new one is admitted; a task with
    no new held-out records waits; an old task's drop no new task explains is unexplained."""
    flipped = ({**OLD}, {**OLD, "nll": 1.3})
    regression = {"known": flipped, "old": (OLD, dict(OLD))}
    gain = {"known": (OLD, dict(OLD)), "clean": (None, {"accuracy": 0.9, "nll": 0.3, "n": 40})}
    report = judge(regression, gain, {"known", "clean", "small"}, RULES)
    assert report.verdicts == {
        "known": Verdict.REJECTED,
        "clean": Verdict.ADMITTED,
        "small": Verdict.WAITING,
    }
    assert report.rejected_tasks() == ["known"] and report.unexplained == []
    regression["old"] = (OLD, {**OLD, "accuracy": 0.5})
    again = judge(regression, gain, {"known", "clean", "small"}, RULES)
    assert sorted({c.task for c in again.unexplained}) == ["old"]


def test_a_ranking_challenger_more_accurate_everywhere_is_not_rejected_for_its_nll() -> None:
    """Judged on accuracy alone (the ranking kind's metrics): the sharper softmax's NLL rise
    that rejected a better model does not count; a real accuracy drop still does."""
    old = {"accuracy": 0.594, "n": 200}
    gain = {"movies": (old, {"accuracy": 0.62, "n": 40})}
    report = judge({"movies": (old, {"accuracy": 0.755, "n": 200})}, gain, {"movies"}, RULES)
    assert report.decision is Decision.PROMOTED, report.reasons
    worse = judge({"movies": (old, {"accuracy": 0.30, "n": 200})}, gain, {"movies"}, RULES)
    assert {c.rule for c in worse.failures} == {"max_drop", "same_task_consistency"}
    assert "its new records look mislabelled" in worse.reasons[-1]
