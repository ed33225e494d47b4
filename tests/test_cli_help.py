"""Every command and subcommand of `aftertune` explains itself: `--help` opens with a
paragraph on what it does and when to use it, not only the one-line summary the command
list shows."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from aftertune.daemon.cli import build_parser, main


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every subcommand under ``parser``, nested ones too, with its path of names."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def test_the_walk_reaches_nested_subcommands() -> None:
    assert {("push",), ("dlq", "list"), ("models", "show"), ("store", "migrate")} <= set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_has_a_description_paragraph(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    description = (COMMANDS[path].description or "").strip()
    # A sentence or two, not the one-line help= summary repeated.
    assert len(description) >= 80, f"`aftertune {' '.join(path)}` has no description paragraph"
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert " ".join(description.split()[:8]) in shown
