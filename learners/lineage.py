"""A version's lineage: what it was made of, recorded once when it is trained.

The registry keeps it with the candidate; a bundle's manifest carries the same facts plus the
version's own adapter. Both are built here, from one dict, so they cannot tell two stories.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from aftertune.learners.base_model import base_sha256
from aftertune.learners.champion import adapter_sha256
from aftertune.learners.specs import LearningSpecs
from aftertune.store.examples import Example
from aftertune.store.registry import Registry, Version


def _ids_sha256(examples: Sequence[Example]) -> str:
    return hashlib.sha256("\n".join(sorted(e.id for e in examples)).encode()).hexdigest()


def candidate_lineage(
    registry: Registry,
    specs: LearningSpecs,
    *,
    parent: int | None,
    new: Sequence[Example],
    past: Sequence[Example],
    seq_range: tuple[int, int],
) -> dict[str, Any]:
    """The lineage a new candidate is registered with: base, parent chain, data, settings."""
    chain = registry.chain(parent) if parent is not None else []
    return {
        "base": specs.base,
        "base_sha256": base_sha256(specs.base),
        "adapters": [
            {"version": v.version, "sha256": adapter_sha256(v.adapter_dir)} for v in chain
        ],
        "parent": parent,
        "trained_on": {
            "count_by_task": dict(Counter(e.task for e in new)),
            "ids_sha256": _ids_sha256(new),
            "seq_range": list(seq_range),
        },
        "replayed": dict(Counter(e.task for e in past)) if specs.replay.enabled else {},
        "config": {
            "lora": asdict(specs.lora),
            "train": {k: v for k, v in asdict(specs.train).items() if k != "template"},
            "replay": asdict(specs.replay),
            "ewc": asdict(specs.ewc),
        },
    }


def manifest_lineage(version: Version) -> dict[str, Any]:
    """The lineage fields of ``version``'s bundle manifest: its adapter chain, itself last."""
    lineage = version.lineage
    return {
        "base_sha256": lineage.get("base_sha256"),
        "adapters": [
            *lineage.get("adapters", []),
            {"version": version.version, "sha256": adapter_sha256(version.adapter_dir)},
        ],
        "lineage": {k: lineage.get(k) for k in ("base", "parent", "trained_on")},
    }
