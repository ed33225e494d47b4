"""What every step of learning works on: the store, the registry, the state dir, the specs.

One value, built once by the ``Workspace`` (``workspace.py``), handed to each step (train a
candidate, score, judge, export, promote) instead of the same four arguments. It also knows
the base model's kind (``kinds.kind_for``) and the state dir's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aftertune.learners.kinds import kind_for
from aftertune.learners.model_kind import ModelKind
from aftertune.learners.specs import LearningSpecs
from aftertune.store.examples import ExampleStore
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry


@dataclass(frozen=True)
class LearningState:
    store: ExampleStore
    registry: Registry
    state_dir: Path
    specs: LearningSpecs
    actor: str = "daemon"  # who the registry's audit log says acted
    kind: ModelKind = field(init=False)
    layout: StateLayout = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", kind_for(self.specs.base))
        object.__setattr__(self, "layout", StateLayout(self.state_dir))
