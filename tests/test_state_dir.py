"""A state dir the daemon cannot write: one line naming the path and the permission, exit 2.

The tests run as root, whom permission bits do not stop: the state dir is put under a
regular file (no directory can be made there), or made immutable with ``chattr +i``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli


def _check_refusal(state: Path, redis_url: str) -> None:
    env = {"AFTERTUNE_STATE_DIR": str(state), "AFTERTUNE_REDIS__URL": redis_url}
    done = run_cli("serve", "--burst", env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(state) in lines[0]
    assert "permission (rwx)" in lines[0]
    assert "Traceback" not in done.stderr


def test_a_state_dir_under_a_regular_file(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "file").write_text("")
    _check_refusal(tmp_path / "file" / "state", redis_url)


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    state.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(state)]).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    yield state
    subprocess.run([chattr, "-i", str(state)], check=True)


def test_an_immutable_state_dir(immutable_dir: Path, redis_url: str) -> None:
    _check_refusal(immutable_dir, redis_url)
