from __future__ import annotations

import json
from pathlib import Path

import pytest

from aftertune.store.errors import RegistryError
from aftertune.store.registry import Registry, VersionState


def _adapter(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


def test_candidates_get_monotonic_versions_and_audit(tmp_path: Path) -> None:
    with Registry(tmp_path / "state") as reg:
        assert reg.champion() is None and reg.versions() == []
        v1 = reg.register_candidate(
            _adapter(tmp_path, "a"),
            parent=None,
            data_seq=10,
            training={"steps": 5},
            lineage={"base_sha256": "x"},
        )
        v2 = reg.register_candidate(
            _adapter(tmp_path, "b"), parent=1, data_seq=20, training={}, lineage={}
        )
        assert (v1.version, v2.version) == (1, 2)
        assert v1.state is VersionState.CANDIDATE
        assert (v1.adapter_dir / "adapter_model.safetensors").read_bytes() == b"weights"
        assert not (tmp_path / "a").exists()  # moved, not copied
        assert [v.version for v in reg.chain(2)] == [1, 2]
        assert reg.latest_candidate() is not None and reg.latest_candidate().version == 2
        log = reg.audit_log()
        assert [(e.version, e.to_state, e.actor) for e in log] == [
            (1, "candidate", "daemon"),
            (2, "candidate", "daemon"),
        ]
    with Registry(tmp_path / "state") as reopened:
        assert reopened.get(1).training == {"steps": 5}
        assert reopened.get(1).lineage == {"base_sha256": "x"}


def test_orphan_from_a_crash_is_replaced_and_bad_input_refused(tmp_path: Path) -> None:
    with Registry(tmp_path / "state") as reg:
        orphan = reg.adapter_dir(1)
        orphan.mkdir(parents=True)
        (orphan / "junk").write_text("half-moved")
        v = reg.register_candidate(
            _adapter(tmp_path, "a"), parent=None, data_seq=1, training={}, lineage={}
        )
        assert v.version == 1 and not (v.adapter_dir / "junk").exists()
        (tmp_path / "empty").mkdir()
        with pytest.raises(RegistryError, match="not a PEFT adapter"):
            reg.register_candidate(
                tmp_path / "empty", parent=None, data_seq=1, training={}, lineage={}
            )
        with pytest.raises(RegistryError, match="no model version 9"):
            reg.get(9)
