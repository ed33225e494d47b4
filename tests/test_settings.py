"""Settings sources: TOML file < environment < command-line overrides, merged key by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aftertune.daemon.errors import SettingsError
from aftertune.daemon.settings import Settings, load_settings


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aftertune.toml"
    path.write_text(text)
    return path


def test_file_env_and_overrides_merge_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _toml(
        tmp_path,
        '[redis]\nstream = "from-file"\ngroup = "file-group"\n[train]\nlr = 0.5\nepochs = 7\n',
    )
    monkeypatch.setenv("AFTERTUNE_TRAIN__LR", "0.25")
    monkeypatch.setenv("AFTERTUNE_REDIS__GROUP", "env-group")
    settings = load_settings(path, {"redis": {"url": "redis://127.0.0.1:1/0"}})
    assert settings.redis.url == "redis://127.0.0.1:1/0"  # override
    assert settings.redis.group == "env-group"  # environment beats the file
    assert settings.redis.stream == "from-file"  # the file's other keys stay
    assert settings.train.lr == 0.25 and settings.train.epochs == 7
    assert settings.ewc.lam == Settings().ewc.lam  # untouched sections keep their defaults


def test_overrides_beat_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTERTUNE_STATE_DIR", str(tmp_path / "env"))
    settings = load_settings(None, {"state_dir": str(tmp_path / "flag")})
    assert settings.state_dir == tmp_path / "flag"


def test_config_from_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AFTERTUNE_CONFIG", str(_toml(tmp_path, "[cycle]\nmin_new_examples = 3\n")))
    assert load_settings().cycle.min_new_examples == 3
    # A Settings built without load_settings reads no file.
    assert Settings().cycle.min_new_examples != 3


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"config file .*nope\.toml does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(SettingsError, match="is not a file"):
        load_settings(tmp_path)


def test_bad_toml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="is not valid TOML") as info:
        load_settings(_toml(tmp_path, "[train\nlr = 1\n"))
    assert "\n" not in str(info.value)


def test_unknown_or_invalid_key_in_the_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"invalid setting train\.lrr: unknown setting"):
        load_settings(_toml(tmp_path, "[train]\nlrr = 1\n"))
    with pytest.raises(SettingsError, match=r"invalid setting train\.epochs"):
        load_settings(_toml(tmp_path, "[train]\nepochs = 0\n"))
