"""The shipped systemd unit, GPU drop-in and example config are valid as shipped.

systemd-analyze checks the unit the way systemd will read it; without it (no systemd on the
machine) those tests skip and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from aftertune.daemon.settings import Settings, load_settings

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
SHIPPED_EXEC = "ExecStart=/usr/bin/env aftertune serve"
MAX_EXPOSURE = 2.0
# "#key = value" and "#[table]" are optional settings shown commented out; "# " is prose.
OPTIONAL_SETTING = re.compile(r"^#(\[[\w.-]+\]|\w+ = .*)$", re.MULTILINE)


def test_example_config_loads() -> None:
    settings = load_settings(SYSTEMD / "aftertune.toml")
    assert settings.state_dir == Path("/var/lib/aftertune")
    assert settings.log_format == "json"


def test_example_config_optional_settings_are_real_settings(tmp_path: Path) -> None:
    text = (SYSTEMD / "aftertune.toml").read_text()
    assert len(OPTIONAL_SETTING.findall(text)) >= 5
    uncommented = tmp_path / "all.toml"
    uncommented.write_text(OPTIONAL_SETTING.sub(r"\1", text))
    settings = load_settings(uncommented)
    assert settings.redis.url is not None
    assert settings.gate.tasks  # the per-task example parsed as a task override


def test_example_config_values_match_the_defaults_it_claims() -> None:
    """The file says its values are the defaults unless a comment says otherwise."""
    shipped = load_settings(SYSTEMD / "aftertune.toml").model_dump()
    defaults = Settings().model_dump()
    for values in (shipped, defaults):  # the departures its comments document
        del values["state_dir"], values["log_format"], values["train"]["progress"]
    assert shipped == defaults


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not on PATH (no systemd here); unit files not checked")
    return path


def unit_copy(tmp_path: Path, *, gpu: bool) -> Path:
    """The shipped unit as it is (with the GPU drop-in beside it when ``gpu``)."""
    text = (SYSTEMD / "aftertune.service").read_text()
    # An absolute path to a venv would make `verify` fail wherever that path does not exist.
    assert SHIPPED_EXEC in text
    unit = tmp_path / "aftertune.service"
    unit.write_text(text)
    if gpu:
        dropins = tmp_path / "aftertune.service.d"
        dropins.mkdir()
        shutil.copy(SYSTEMD / "gpu.conf", dropins / "gpu.conf")
    return unit


@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu-drop-in"])
def test_unit_verifies_cleanly(tmp_path: Path, gpu: bool) -> None:
    analyze = systemd_analyze()
    unit = unit_copy(tmp_path, gpu=gpu)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # Unknown keys and bad values are only warnings ("FILE:LINE: ..., ignoring."), rc 0.
    markers = ("Unknown", "ignoring", "aftertune.service", "gpu.conf")
    assert [line for line in out.splitlines() if any(m in line for m in markers)] == []


@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu-drop-in"])
def test_unit_exposure_is_low(tmp_path: Path, gpu: bool) -> None:
    analyze = systemd_analyze()
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"systemd (\d+)", version.stdout)
    if found is None or int(found.group(1)) < 250:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    unit = unit_copy(tmp_path, gpu=gpu)
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = done.stdout + done.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert exposure is not None, out
    assert float(exposure.group(1)) <= MAX_EXPOSURE, out
    if gpu:  # the drop-in was read: the NVIDIA device groups are in the ACL
        assert "char-nvidia-uvm" in out


def _install_lines(text: str) -> list[str]:
    """The `install ...` commands a text tells a reader to run, comment marks stripped."""
    lines = [line.lstrip("# ").split("   (")[0].split("  #")[0] for line in text.splitlines()]
    return [line.strip() for line in lines if line.startswith("install ")]


@pytest.mark.parametrize("source", ["systemd/aftertune.service", "docs/systemd.md"])
def test_install_instructions_work_on_a_fresh_host(tmp_path: Path, source: str) -> None:
    """Run as written from the checkout, into a root holding only what any systemd host
    has (/etc/systemd/system): /etc/aftertune and the drop-in directory are not assumed."""
    checkout = SYSTEMD.parent
    commands = _install_lines((checkout / source).read_text())
    assert any("/etc/aftertune/aftertune.toml" in c for c in commands), commands
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for command in commands:
        relocated = command.replace(" /etc/", f" {root}/etc/")
        done = subprocess.run(
            relocated, shell=True, cwd=checkout, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, (command, done.stderr)
    assert (root / "etc/aftertune/aftertune.toml").read_bytes() == (
        SYSTEMD / "aftertune.toml"
    ).read_bytes()
    assert (root / "etc/systemd/system/aftertune.service").is_file()
    assert (root / "etc/systemd/system/aftertune.service.d/gpu.conf").is_file()


CONSUMER_UNITS = ["aftertune-follow.service", "aftertune-answer.service"]


@pytest.mark.parametrize("name", CONSUMER_UNITS)
def test_consumer_units_verify_cleanly_with_low_exposure(tmp_path: Path, name: str) -> None:
    """The consumer host's units, checked like the daemon's: as shipped, no warnings, and
    no more exposed than it."""
    analyze = systemd_analyze()
    text = (SYSTEMD / name).read_text()
    assert "ExecStart=/usr/bin/env aftertune " in text  # no venv path that exists only here
    unit = tmp_path / name
    unit.write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert [line for line in out.splitlines() if "Unknown" in line or "ignoring" in line] == []
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert exposure is not None, done.stdout + done.stderr
    assert float(exposure.group(1)) <= MAX_EXPOSURE


@pytest.mark.parametrize("name", CONSUMER_UNITS)
def test_consumer_units_install_lines_work_on_a_fresh_host(tmp_path: Path, name: str) -> None:
    checkout = SYSTEMD.parent
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for command in _install_lines((SYSTEMD / name).read_text()):
        relocated = command.replace(" /etc/", f" {root}/etc/")
        done = subprocess.run(
            relocated, shell=True, cwd=checkout, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, (command, done.stderr)
    assert (root / "etc/systemd/system" / name).is_file()
    assert (root / "etc/aftertune/consumer.env").is_file()
