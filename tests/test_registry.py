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


def test_candidates_get_monotonic_versions_and_audit(tmp_path: Path, store_url: str | None) -> None:
    with Registry(tmp_path / "state", store_url) as reg:
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
        assert [v.version for v in reg.in_state(VersionState.CANDIDATE)] == [1, 2]
        log = reg.audit_log()
        assert [(e.version, e.to_state, e.actor) for e in log] == [
            (1, "candidate", "daemon"),
            (2, "candidate", "daemon"),
        ]
    with Registry(tmp_path / "state", store_url) as reopened:
        assert reopened.get(1).training == {"steps": 5}
        assert reopened.get(1).lineage == {"base_sha256": "x"}


def test_orphan_from_a_crash_is_replaced_and_bad_input_refused(
    tmp_path: Path, store_url: str | None
) -> None:
    with Registry(tmp_path / "state", store_url) as reg:
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


def _register(reg: Registry, tmp: Path, name: str, parent: int | None) -> int:
    return reg.register_candidate(
        _adapter(tmp, name), parent=parent, data_seq=1, training={}, lineage={}
    ).version


def test_promotion_retires_the_old_champion_and_rollback_restores_it(
    tmp_path: Path, store_url: str | None
) -> None:
    with Registry(tmp_path / "state", store_url) as reg:
        v1 = _register(reg, tmp_path, "a", None)
        reg.transition(v1, VersionState.EVALUATING, actor="daemon", reason="gate")
        reg.promote(v1, actor="daemon", reason="passed", gate={"decision": "promoted"})
        v2 = _register(reg, tmp_path, "b", v1)
        reg.transition(v2, VersionState.EVALUATING, actor="daemon", reason="gate")
        reg.promote(v2, actor="daemon", reason="passed")
        assert reg.champion().version == v2
        assert reg.get(v1).state is VersionState.RETIRED
        reg.rollback(v1, actor="cli:ops", reason="v2 misbehaves")
        assert reg.champion().version == v1
        assert reg.get(v2).state is VersionState.RETIRED
        assert reg.get(v1).gate == {"decision": "promoted"}
        assert [v.version for v in reg.in_state(VersionState.PROMOTED)] == [v1]
        last = reg.audit_log()[-2:]
        assert {(e.version, e.to_state, e.actor) for e in last} == {
            (v1, "promoted", "cli:ops"),
            (v2, "retired", "cli:ops"),
        }


def test_invalid_transitions_are_refused_with_a_clear_message(
    tmp_path: Path, store_url: str | None
) -> None:
    with Registry(tmp_path / "state", store_url) as reg:
        v1 = _register(reg, tmp_path, "a", None)
        reg.transition(v1, VersionState.REJECTED, actor="daemon", reason="bad")
        with pytest.raises(RegistryError, match="version 1 is rejected; it cannot become promoted"):
            reg.promote(v1, actor="cli", reason="approve")
        with pytest.raises(RegistryError, match="only a retired former champion"):
            reg.rollback(v1, actor="cli")
        assert reg.champion() is None
        assert [e.to_state for e in reg.audit_log(v1)] == ["candidate", "rejected"]


def test_on_postgres_another_daemon_finds_each_version_s_adapter(
    tmp_path: Path, postgres_url: str
) -> None:
    """Daemon b takes over training from a: it needs the champion's chain of adapters, which
    a wrote on its own disk. The registry kept them in PostgreSQL."""
    with Registry(tmp_path / "a", postgres_url) as a, Registry(tmp_path / "b", postgres_url) as b:
        v1 = a.register_candidate(
            _adapter(tmp_path, "x"), parent=None, data_seq=3, training={}, lineage={}
        )
        assert not (tmp_path / "b" / "adapters" / "v1").exists()
        seen = b.get(1)
        assert seen.adapter_dir == tmp_path / "b" / "adapters" / "v1"
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (seen.adapter_dir / name).read_bytes() == (v1.adapter_dir / name).read_bytes()
        assert b.chain(1)[0].adapter_dir.is_dir()


def test_on_postgres_the_trainer_s_state_files_reach_the_next_trainer(
    tmp_path: Path, postgres_url: str
) -> None:
    """The online EWC Fisher a dead trainer left is what the daemon taking over starts from."""
    fisher_a = tmp_path / "a" / "ewc" / "fisher.safetensors"
    fisher_b = tmp_path / "b" / "ewc" / "fisher.safetensors"
    fisher_a.parent.mkdir(parents=True)
    fisher_a.write_bytes(b"fisher of v1")
    with Registry(tmp_path / "a", postgres_url) as a, Registry(tmp_path / "b", postgres_url) as b:
        assert b.restore_state_file("ewc/fisher.safetensors", fisher_b) is False  # none yet
        assert a.keep_state_file("ewc/fisher.safetensors", fisher_a)
        assert b.restore_state_file("ewc/fisher.safetensors", fisher_b)
        assert fisher_b.read_bytes() == b"fisher of v1"
        assert b.restore_state_file("ewc/fisher.safetensors", fisher_b) is False  # same
    with Registry(tmp_path / "c") as sqlite:  # one host: the state dir is the record
        assert sqlite.keep_state_file("ewc/fisher.safetensors", fisher_a) is False
