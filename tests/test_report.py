"""`aftertune report`: the HTML page from a real registry whose gate decisions come from
the real gate (``judge``) on made-up scores. No model, no torch: fast."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from spec_fixtures import gate_rules

from aftertune.daemon.cli import main
from aftertune.daemon.report import render_report
from aftertune.learners.gate import Decision, MetricRules, judge
from aftertune.store.registry import Registry, Version, VersionState

EVIL = '<script>alert("task")</script>'
Scores = dict[str, float]


def _adapter(tmp: Path, name: str) -> Path:
    path = tmp / "incoming" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (path / "adapter_model.safetensors").write_bytes(name.encode())
    return path


def _cycle(reg: Registry, tmp: Path, challenger: dict[str, Scores], new: set[str]) -> Version:
    """One learning cycle as promotion.run_cycle records it, with scores given, not measured."""
    champion = reg.champion()
    parent = champion.version if champion is not None else None
    chain = reg.chain(parent) if parent is not None else []
    lineage = {
        "base": "embedded:tiny",
        "base_sha256": "ab" * 32,
        "adapters": [{"version": v.version, "sha256": f"{v.version:02d}" * 32} for v in chain],
        "parent": parent,
        "trained_on": {
            "count_by_task": {t: 40 for t in sorted(new)},
            "ids_sha256": "cd" * 32,
            "seq_range": [10 * len(chain), 10 * len(chain) + 10],
        },
        "replayed": {t: 12 for t in (champion.metrics if champion else {})},
    }
    v = reg.register_candidate(
        _adapter(tmp, f"a{len(reg.versions())}"),
        parent=parent,
        data_seq=10 * len(chain) + 10,
        training={"steps": 40},
        lineage=lineage,
    )
    reg.transition(v.version, VersionState.EVALUATING, actor="daemon", reason="gate evaluation")
    known = {t: m["challenger"] for t, m in (champion.metrics if champion else {}).items()}
    regression = {t: (known[t], s) for t, s in challenger.items() if t in known}
    gain = {t: (known.get(t), challenger[t]) for t in new}
    rules = gate_rules(per_task={"parity": MetricRules(floor={"accuracy": 0.5})})
    report = judge(regression, gain, new, rules)
    base: Scores = {"accuracy": 0.3, "nll": 3.0, "n": 50}
    reg.set_metrics(
        v.version,
        {
            t: {
                "champion": known.get(t, base),
                "challenger": s,
                "suites": {"regression": {"champion": known.get(t, base), "challenger": s}},
            }
            for t, s in challenger.items()
        },
    )
    why = "; ".join(report.reasons)
    if report.decision is Decision.PROMOTED:
        return reg.promote(v.version, actor="daemon", reason=why, gate=report.to_json())
    return reg.transition(
        v.version, VersionState.REJECTED, actor="daemon", reason=why, gate=report.to_json()
    )


def build_history(state: Path, tmp: Path) -> None:
    """Six versions: promoted, promoted, rejected (sentiment drops), promoted (adds a task
    named like a script), rejected (no NLL gain), and a candidate not yet evaluated."""
    with Registry(state) as reg:
        parity, sentiment = {"accuracy": 0.62, "nll": 1.9, "n": 50}, {"accuracy": 0.7, "nll": 1.4}
        _cycle(reg, tmp, {"parity": parity, "sentiment": sentiment}, {"parity", "sentiment"})
        parity = {"accuracy": 0.74, "nll": 1.5, "n": 50}
        summary = {"token_f1": 0.41, "nll": 2.6, "n": 30}
        sentiment = {"accuracy": 0.82, "nll": 1.2, "n": 50}
        _cycle(
            reg,
            tmp,
            {"parity": parity, "sentiment": sentiment, "summary": summary},
            {"parity", "sentiment", "summary"},
        )
        worse = {"accuracy": 0.7, "nll": 1.25, "n": 50}
        better = {"accuracy": 0.8, "nll": 1.3, "n": 50}
        assert (
            _cycle(reg, tmp, {"parity": better, "sentiment": worse, "summary": summary}, {"parity"})
        ).state is VersionState.REJECTED
        evil = {"accuracy": 0.55, "nll": 2.0, "n": 20}
        summary = {"token_f1": 0.52, "nll": 2.2, "n": 30}
        scores = {"parity": better, "sentiment": sentiment, "summary": summary, EVIL: evil}
        _cycle(reg, tmp, scores, {"parity", "summary", EVIL})
        flat = {**better, "accuracy": 0.81, "nll": 1.299}
        _cycle(reg, tmp, {**scores, "parity": flat}, {"parity"})
        reg.register_candidate(
            _adapter(tmp, "last"), parent=4, data_seq=60, training={}, lineage={}
        )


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One history for the whole module: the tests only read it."""
    tmp = tmp_path_factory.mktemp("history")
    build_history(tmp / "state", tmp)
    return tmp / "state"


def _heatmap(page: str) -> str:
    found = re.search(r'<svg class="heatmap".*?</svg>', page, re.S)
    assert found, "no heatmap on the page"
    return found.group(0)


def test_rejected_version_shows_why_it_failed(state: Path) -> None:
    with Registry(state) as reg:
        page = render_report(reg, 3)
        reasons = reg.get(3).gate["reasons"]
    assert len(reasons) == 1
    assert reasons[0].startswith(
        "sentiment: accuracy on earlier held-out records 82.0% -> 70.0%: fell by 12.0 points"
    )
    assert html.escape(reasons[0]) in page
    failed = re.findall(r'<tr class="fail">(.*?)</tr>', page, re.S)
    assert len(failed) == 1 and "sentiment" in failed[0] and "FAIL" in failed[0]
    assert page.count('<tr class="pass">') >= 3  # the checks that held are listed too


def test_heatmap_has_a_cell_per_task_and_version_and_marks_rejected(state: Path) -> None:
    with Registry(state) as reg:
        page = render_report(reg)
    heatmap = _heatmap(page)
    tasks, versions, rejected = 4, 6, 2
    assert heatmap.count('class="cell"') == tasks * versions
    assert heatmap.count('stroke-dasharray="4 2"') == tasks * rejected
    assert "summary, v1 (retired): no score" in heatmap  # summary arrived with v2
    assert "parity, v2 (retired): accuracy 0.740" in heatmap


def test_task_names_and_messages_are_escaped(state: Path) -> None:
    with Registry(state) as reg:
        page = render_report(reg, 4)
    assert "<script" not in page.lower()  # neither the user's nor any of ours
    assert html.escape(EVIL) in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)  # self-contained


def test_charts_show_rejected_points_apart_from_champions(state: Path) -> None:
    with Registry(state) as reg:
        charts = render_report(reg).split('<div class="charts">')[1]
    # Two charts (score, NLL) per task; v3 and v5 are rejected and scored 3 and 4 tasks.
    assert charts.count('class="point rejected"') == 2 * (3 + 4)
    assert charts.count('class="point champion"') == 2 * (2 + 3 + 4)
    assert charts.count("<h3>") == 4


def test_version_without_metrics_and_empty_registry(state: Path, tmp_path: Path) -> None:
    with Registry(state) as reg:
        page = render_report(reg)  # latest: v6, a candidate never evaluated
    assert "No gate decision recorded for v6" in page
    assert "Lineage of v6" in page and "Audit log" in page
    with Registry(tmp_path / "empty") as reg:
        assert "No model versions yet" in render_report(reg)
        reg.register_candidate(
            _adapter(tmp_path, "nan"), parent=None, data_seq=1, training={}, lineage={}
        )
        nan = {"accuracy": float("nan"), "nll": float("inf")}
        reg.set_metrics(1, {"parity": {"challenger": nan}})
        diverged = render_report(reg)
    assert "No version has metrics yet" in diverged  # a diverged run's NaN is not a score


def test_cli_writes_the_page_atomically(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "report.html"
    assert main(["report", "3", "--state-dir", str(state), "--html", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.iterdir()] == ["report.html"]  # no temp file left behind


def test_cli_unknown_version_fails_clearly(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "report.html"
    assert main(["report", "99", "--state-dir", str(state), "--html", str(target)]) == 1
    err = capsys.readouterr().err
    assert "no model version 99" in err and "aftertune models" in err
    assert not target.exists()
    missing = tmp_path / "nowhere" / "r.html"
    assert main(["report", "--state-dir", str(state), "--html", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_report_path_does_not_import_torch() -> None:
    code = (
        "import sys, aftertune.daemon.cli_models, aftertune.daemon.report;"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# capfd, not capsys: with --json the answer is written to file descriptor 1 itself.
def test_models_and_models_show_print_labelled_tables_with_units(
    state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--state-dir", str(state)]) == 0
    out = capfd.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["version", "state", "parent"] and "%" in out
    assert main(["models", "show", "v3", "--state-dir", str(state)]) == 0
    card = capfd.readouterr().out
    assert card.startswith("v3: rejected\n")
    for text in (
        "metrics (held-out):",
        "nats/token",
        " pp ",
        "gate: rejected",
        "FAIL",
        "audit log:",
    ):
        assert text in card, text
    assert "not published" in card  # a rejected version has no bundle
    assert main(["models", "show", "3", "--json", "--state-dir", str(state)]) == 0
    shown = json.loads(capfd.readouterr().out)
    assert shown["version"] == 3 and shown["gate"]["decision"] == "rejected"


def test_version_help_exit_codes_completion_and_report_json(
    state: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.fullmatch(r"aftertune \S+\n", capfd.readouterr().out)
    with pytest.raises(SystemExit):
        main(["--help"])
    helped = capfd.readouterr().out
    assert "3  `cycle`: the challenger was rejected" in helped and "5  `cycle`: nothing" in helped
    assert main(["completion", "bash"]) == 0
    script = capfd.readouterr().out
    assert "models" in script and "--log-level" in script
    target = tmp_path / "r.html"
    assert main(["report", "v2", "--json", "--html", str(target), "--state-dir", str(state)]) == 0
    assert json.loads(capfd.readouterr().out)["version"] == 2
    with pytest.raises(SystemExit) as bad:
        main(["models", "show", "three", "--state-dir", str(state)])
    assert bad.value.code == 2 and "not a version" in capfd.readouterr().err


def test_reject_json_answers_with_the_decision(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with Registry(tmp_path / "state") as reg:
        reg.register_candidate(
            _adapter(tmp_path, "w"), parent=None, data_seq=1, training={}, lineage={}
        )
        reg.transition(1, VersionState.EVALUATING, actor="daemon", reason="gate evaluation")
        reg.transition(1, VersionState.AWAITING_APPROVAL, actor="daemon", reason="gate passed")
    args = ["reject", "v1", "--why", "not today", "--json", "--state-dir", str(tmp_path / "state")]
    assert main(args) == 0
    assert json.loads(capfd.readouterr().out) == {"version": 1, "state": "rejected", "bundle": None}


def test_the_cli_and_the_report_print_a_moment_alike_in_utc() -> None:
    from aftertune.daemon import cli_versions, report
    from aftertune.daemon.tables import when

    assert when(0) == "1970-01-01 00:00 UTC" and when(None) == "—"
    assert when(1_700_000_000.0) == "2023-11-14 22:13 UTC"
    # One copy: `models`, `models show N` and the HTML report all print through it.
    assert cli_versions.when is when and report.when is when
