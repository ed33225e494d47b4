"""The light paths stay light: the CLI, the daemon's loop and a consumer load no torch.

`aftertune push`, `pull` and `status` must start in well under a second, and the scheduler
must not pay torch's import until a cycle runs. Each import runs in a fresh interpreter, so
what another test imported does not count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft")
LIGHT = (
    "aftertune.daemon.cli",
    "aftertune.daemon.scheduler",
    "aftertune.daemon.worker",
    "aftertune.daemon.service",
    "aftertune.daemon.pull",
    "aftertune.store.consumer",
)


@pytest.mark.parametrize("module", LIGHT)
def test_importing_a_light_module_loads_no_torch(module: str) -> None:
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} loads {done.stdout.strip()}"
