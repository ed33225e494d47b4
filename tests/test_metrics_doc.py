"""Every metric the daemon exports is documented, with its unit, in docs/operations.md."""

from __future__ import annotations

import re
from pathlib import Path

import prometheus_client

from aftertune.daemon.metrics import DaemonMetrics

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def test_every_exported_metric_has_a_documented_unit() -> None:
    text = prometheus_client.generate_latest(DaemonMetrics().registry).decode()
    # A counter's `_created` sample is described once, below the table.
    families = {f for f in re.findall(r"^# TYPE (\S+) ", text, re.M) if not f.endswith("_created")}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= {
        f + "_total" if f == "process_cpu_seconds" else f for f in families
    }
    assert re.search(r'^aftertune_build_info\{python="[^"]+",version="[^"]+"\} 1\.0$', text, re.M)
    rows = {}
    for line in OPERATIONS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for name in re.findall(r"`([a-z_]+)", cells[0]):
                rows[name] = cells[2]
    for family in families:
        documented = {n for n in rows if n.startswith(family)}
        assert documented, f"{family} is not in the metrics table of docs/operations.md"
        assert all(rows[n] for n in documented), f"{family} has no unit in docs/operations.md"
