"""The light paths stay light: the CLI, the daemon's loop and a consumer load no torch.

`aftertune push`, `pull` and `status` must start in well under a second, and the scheduler
must not pay torch's import until a cycle runs. Each import runs in a fresh interpreter, so
what another test imported does not count.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "peft")
LIGHT = (
    "aftertune.daemon.cli",
    "aftertune.daemon.scheduler",
    "aftertune.daemon.worker",
    "aftertune.daemon.service",
    "aftertune.store.consumer.pull",
    "aftertune.store.consumer",
    "aftertune.store.consumer.follow",
    "aftertune.daemon.cli_deploy",
    "aftertune.daemon.answer_server",
    "aftertune.daemon.hot_swap",
)
CONSUMER_DIR = Path(__file__).resolve().parents[1] / "store" / "consumer"
# The consumer side, module by module: what a consumer's program imports.
CONSUMER = sorted(
    f"aftertune.store.consumer.{m.name}" for m in pkgutil.iter_modules([CONSUMER_DIR])
)


@pytest.mark.parametrize("module", LIGHT)
def test_importing_a_light_module_loads_no_torch(module: str) -> None:
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} loads {done.stdout.strip()}"


@pytest.mark.parametrize("module", CONSUMER)
def test_the_consumer_side_needs_no_learner_no_daemon_no_torch(module: str) -> None:
    banned = ("aftertune.learners", "aftertune.daemon", *HEAVY)
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({banned!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} loads {done.stdout.strip()}"
