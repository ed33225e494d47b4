"""bench/ingest.py end to end on a few thousand records: every figure it prints is there,
and each consumer it times stored every record (it exits otherwise)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ingest.py"


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ingest", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ingest_bench_prints_rates_ratios_and_stages(capsys: pytest.CaptureFixture[str]) -> None:
    _bench_module().main(["--records", "3000", "--batch-size", "500", "--floor", "--breakdown"])
    out = capsys.readouterr().out
    rates = {
        name: float(value.replace(",", ""))
        for name, value in re.findall(r"^\((\w)\).*:\s+([\d,]+) records/s$", out, re.M)
    }
    assert set(rates) == {"a", "b", "c"} and all(r > 0 for r in rates.values()), out
    ratios = dict(re.findall(r"^ratio (\w/\w)\s+:\s+([\d.]+)$", out, re.M))
    assert float(ratios["b/a"]) == pytest.approx(rates["b"] / rates["a"], abs=0.01)
    assert float(ratios["c/a"]) == pytest.approx(rates["c"] / rates["a"], abs=0.01)
    stages = re.search(r"read ([\d.]+), validate ([\d.]+), store ([\d.]+), acknowledge", out)
    assert stages and all(float(s) > 0 for s in stages.groups()), out
