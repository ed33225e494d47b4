"""The report as a real browser lays it out: headless Chromium loads the page with a probe
script appended, and ``--dump-dom`` returns what the probe measured.

Skipped, with the reason, where no Chromium is installed (`apt-get install chromium`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import _cycle, build_history

from aftertune.daemon.report import render_report
from aftertune.store.registry import Registry

CHROMIUM = next(
    (
        found
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (found := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium"
)

# Runs after the page has loaded; writes its findings into the DOM for --dump-dom.
PROBE = """<script>
const lines = el => { const r = document.createRange(); r.selectNodeContents(el);
  return new Set([...r.getClientRects()].map(q => Math.round(q.top))).size; };
const overlap = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width &&
  a.y < b.y + b.height && b.y < a.y + a.height;
const found = {wrapped: [], repeatedTicks: [], negativeNll: [], overlaps: 0, legend: 0};
for (const el of document.querySelectorAll("td:first-child, td.word, .chart h3"))
  if (lines(el) > 1) found.wrapped.push(el.textContent);
document.querySelectorAll(".chart svg").forEach((svg, i) => {
  const labels = [...svg.querySelectorAll("text[text-anchor=end]")].map(t => t.textContent);
  if (new Set(labels).size !== labels.length) found.repeatedTicks.push(labels.join(" "));
  if (i % 2 === 1 && labels.some(l => l.startsWith("-"))) found.negativeNll.push(labels.join(" "));
  const boxes = [...svg.querySelectorAll("text")].map(t => t.getBBox());
  boxes.forEach((a, j) => boxes.slice(j + 1).forEach(b => { if (overlap(a, b)) found.overlaps++; }));
});
found.legend = document.querySelectorAll(".legend svg rect").length;
document.body.setAttribute("data-probe", JSON.stringify(found));
</script>"""


def _measure(page: str, tmp_path: Path, width: int) -> dict[str, object]:
    path = tmp_path / "report.html"
    path.write_text(page.replace("</main></body>", "</main>" + PROBE + "</body>"))
    done = subprocess.run(
        [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         f"--window-size={width},2000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, done.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


LONG = "sentiment_of_short_movie_review_sentences"


def _tiny_nll_history(state: Path, tmp: Path) -> None:
    """The demo's shape: NLL near 0 over a small range (it once put a negative NLL and
    repeated '0.00' labels on the axis), and a long task name."""
    with Registry(state) as reg:
        for nll in (0.0075, 0.0013, 0.018):
            _cycle(reg, tmp, {LONG: {"accuracy": 1.0, "nll": nll, "n": 40}}, {LONG})


@pytest.mark.parametrize(("history", "width"), [("mixed", 1280), ("mixed", 700), ("tiny", 700)])
def test_chromium_lays_the_report_out_cleanly(tmp_path: Path, history: str, width: int) -> None:
    build = build_history if history == "mixed" else _tiny_nll_history
    build(tmp_path / "state", tmp_path)
    with Registry(tmp_path / "state") as registry:
        page = render_report(registry, 3)
    found = _measure(page, tmp_path, width)
    assert found["wrapped"] == [], "task names and labels must not wrap mid-word"
    assert found["repeatedTicks"] == [], "every axis label must differ"
    assert found["negativeNll"] == [], "an NLL axis never goes below 0"
    assert found["overlaps"] == 0, "chart labels must not overlap"
    assert found["legend"] == 5, "the heatmap has its colour legend"
