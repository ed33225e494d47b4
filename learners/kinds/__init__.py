"""The registry of model kinds: each kind is a folder here, registered below.

A base model's kind is the newest registered kind that ``accepts`` its ``config.json``; the
built-in ones are ``generative`` (a causal LM) and ``ranking`` (a sentence encoder). A new
kind is a new folder with a class that follows ``learners/model_kind.py::ModelKind``, and one
``register`` call: generic code (the cycle, evaluation, EWC, the recipe, promotion) asks the
kind through that protocol and never imports a kind.
"""

from __future__ import annotations

import json
from pathlib import Path

from aftertune.learners.base_model import resolve_base
from aftertune.learners.errors import BaseModelError
from aftertune.learners.kinds.generative import Generative
from aftertune.learners.kinds.ranking import Ranking
from aftertune.learners.model_kind import ModelKind

_KINDS: list[ModelKind] = []  # in registration order; the newest is asked first


def register(kind: ModelKind) -> None:
    """Add ``kind`` (or replace the one of the same name); it is asked before older ones."""
    _KINDS[:] = [k for k in _KINDS if k.name != kind.name]
    _KINDS.append(kind)


def unregister(name: str) -> None:
    """Remove the kind called ``name`` (tests plug a toy kind in and out)."""
    _KINDS[:] = [k for k in _KINDS if k.name != name]


def registered() -> list[str]:
    """The names of the registered kinds, oldest first."""
    return [k.name for k in _KINDS]


def kind_for(base: str | Path) -> ModelKind:
    """The kind of base model ``base`` (``model.base``)."""
    path = resolve_base(base)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    for kind in reversed(_KINDS):
        if kind.accepts(config):
            return kind
    raise BaseModelError(
        f"no model kind accepts the base at {str(path)!r}; registered: {', '.join(registered())}"
    )


register(Generative())
register(Ranking())
