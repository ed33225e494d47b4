"""pyproject.toml packages every directory of the three packages: no file left out of a
wheel, and no setuptools warning about a data directory it had to guess."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_directory_is_a_listed_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for path in [ROOT / folder, *(ROOT / folder).rglob("*")]:
            if path.is_dir() and "__pycache__" not in path.parts:
                rel = path.relative_to(ROOT / folder).parts
                found.add(".".join((package, *rel)))
    assert listed == found
    assert isinstance(project["project"]["license"], str)  # an SPDX expression, not a table
