"""Settings sources: TOML file < environment < command-line overrides, merged key by key."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import redis
from conftest import run_cli

from aftertune.daemon.errors import SettingsError
from aftertune.daemon.settings import (
    MAX_IDLE_MS,
    Settings,
    check_environment,
    load_settings,
    section_fields,
)
from aftertune.learners.training_specs import MAX_SEED


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


def _float_settings() -> list[tuple[str, str, object]]:
    """(section, field, a value holding inf) for every float setting, dict values included;
    the learners' spec classes that are sections too."""
    out = []
    for section, info in Settings.model_fields.items():
        fields = section_fields(info.annotation)
        for name, field in (fields or {}).items():
            kind = str(field.annotation)
            if "[str, float]" in kind:
                out.append((section, name, {"accuracy": math.inf}))
            elif "float" in kind:
                out.append((section, name, math.inf))
    return out


@pytest.mark.parametrize(
    ("section", "name", "value"), _float_settings(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_no_float_setting_takes_inf_or_nan(section: str, name: str, value: object) -> None:
    with pytest.raises(SettingsError, match=rf"invalid setting {section}\.{name}") as info:
        load_settings(overrides={section: {name: value}})
    assert "\n" not in str(info.value)
    nan = {"accuracy": math.nan} if isinstance(value, dict) else math.nan
    with pytest.raises(SettingsError, match=rf"invalid setting {section}\.{name}"):
        load_settings(overrides={section: {name: nan}})


def test_inf_from_the_file_and_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both crashed `serve` (OverflowError in the scheduler) after passing validation.
    with pytest.raises(SettingsError, match=r"invalid setting cycle\.interval_s: .*finite"):
        load_settings(_toml(tmp_path, "[cycle]\ninterval_s = inf\n"))
    monkeypatch.setenv("AFTERTUNE_CYCLE__CHECK_EVERY_S", "nan")
    with pytest.raises(SettingsError, match=r"invalid setting cycle\.check_every_s"):
        load_settings()


@pytest.mark.parametrize(
    ("toml", "field", "why"),
    [
        ("[gate]\nmax_drop = { accuracy = -0.5 }", r"gate\.max_drop", "accuracy must be"),
        ("[gate]\nmax_drop_rel = { nll = -0.1 }", r"gate\.max_drop_rel", "nll must be"),
        ("[gate]\nmax_drop = { token_f1 = 5 }", r"gate\.max_drop", "token_f1 must be"),
        ("[gate]\nfloor = { accuracy = 1.5 }", r"gate\.floor", "accuracy must be"),
        ("[gate]\nfloor = { nll = -1 }", r"gate\.floor", "nll must be"),
        ("[gate.tasks.noisy]\nmax_drop = { accuracy = -1 }", r"gate\.tasks\.noisy\.max_drop", ""),
        ("[gate]\nmin_gain = 2", r"gate\.min_gain", ""),
        ("[cycle]\ninterval_s = 1e300", r"cycle\.interval_s", ""),
        ("[cycle]\nshutdown_timeout_s = 1e12", r"cycle\.shutdown_timeout_s", ""),
        ("[ingest]\nblock_ms = 60000", r"ingest\.block_ms", ""),
    ],
)
def test_out_of_range_thresholds_are_refused_at_load(
    tmp_path: Path, toml: str, field: str, why: str
) -> None:
    """Each passed validation before, then failed every cycle (or every poll) at run time."""
    with pytest.raises(SettingsError, match=rf"invalid setting {field}: .*{why}") as info:
        load_settings(_toml(tmp_path, toml + "\n"))
    assert "\n" not in str(info.value)


def test_every_learner_section_is_checked_for_inf() -> None:
    checked = {section for section, _, _ in _float_settings()}
    assert {"lora", "train", "replay", "ewc", "gate", "export", "cycle"} <= checked


@pytest.mark.parametrize(
    ("toml", "field", "why"),
    [
        (
            f"[ingest]\nclaim_idle_ms = {10**19}",
            r"ingest\.claim_idle_ms",
            "less than or equal to 3153",
        ),
        ("[ingest]\nclaim_idle_ms = 9e18", r"ingest\.claim_idle_ms", "less than or equal to 3153"),
        (f"[train]\nseed = {2**70}", r"train\.seed", "less than or equal to 4294967295"),
        ("[train]\nseed = -1", r"train\.seed", "greater than or equal to 0"),
    ],
)
def test_values_the_libraries_cannot_take_are_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, field: str, why: str
) -> None:
    """Each passed validation, then crashed: `serve` in XAUTOCLAIM (a 64-bit idle time), and
    `train` with an OverflowError seeding torch."""
    with pytest.raises(SettingsError, match=rf"invalid setting {field}: .*{why}") as info:
        load_settings(_toml(tmp_path, toml + "\n"))
    assert "\n" not in str(info.value)
    monkeypatch.setenv("AFTERTUNE_TRAIN__SEED", str(2**70))  # the same from the environment
    with pytest.raises(SettingsError, match=r"invalid setting train\.seed"):
        load_settings()


def test_the_largest_seed_and_claim_idle_time_work(redis_client: redis.Redis) -> None:
    """The bounds are what the libraries take, not tighter: torch, numpy and random seed with
    the largest seed, and Redis claims with the longest idle time."""
    import numpy
    import torch

    settings = load_settings(
        overrides={"train": {"seed": MAX_SEED}, "ingest": {"claim_idle_ms": MAX_IDLE_MS}}
    )
    torch.manual_seed(settings.train.seed)
    numpy.random.seed(settings.train.seed)
    random.Random(settings.train.seed)
    redis_client.xgroup_create("bounds", "g", id="0", mkstream=True)
    redis_client.xautoclaim("bounds", "g", "c", min_idle_time=settings.ingest.claim_idle_ms)
    with pytest.raises(redis.ResponseError):  # what 1e19 did to `serve`
        redis_client.xautoclaim("bounds", "g", "c", min_idle_time=10**19)


def test_the_gate_built_from_loaded_settings_never_refuses_them() -> None:
    """Whatever loads builds the gate's rules: no cycle fails on a threshold at run time."""
    from aftertune.daemon.specs import specs_from

    settings = load_settings(
        overrides={"gate": {"floor": {"accuracy": 0.0, "nll": 0.0}, "max_drop": {"nll": 0.0}}}
    )
    assert specs_from(settings).rules.default.floor["accuracy"] == 0.0


def test_the_cluster_key_comes_from_the_environment_and_a_short_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aftertune.daemon.announce import cluster_key

    assert cluster_key(load_settings()) is None  # unset: events go unsigned
    monkeypatch.setenv("AFTERTUNE_CLUSTER__KEY", "0123456789abcdef")
    assert cluster_key(load_settings()) == b"0123456789abcdef"
    assert "0123456789abcdef" not in repr(load_settings())  # a secret: never printed
    monkeypatch.setenv("AFTERTUNE_CLUSTER__KEY", "short-secret")
    with pytest.raises(
        SettingsError, match=r"invalid setting cluster\.key: .*at least 16 characters"
    ) as refused:
        load_settings()
    assert "short-secret" not in str(refused.value)  # nor in the journal


@pytest.mark.parametrize("token", ["", "   ", "\t"])
def test_an_empty_token_is_refused(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    # It used to switch authentication off without a word.
    monkeypatch.setenv("AFTERTUNE_SERVER__TOKEN", token)
    with pytest.raises(SettingsError, match=r"invalid setting server\.token: must not be empty"):
        load_settings()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost", "LocalHost"])
def test_no_token_is_fine_on_a_loopback_bind(host: str) -> None:
    assert load_settings(overrides={"server": {"host": host}}).server.token is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "trainer.example.com"])
def test_a_non_loopback_bind_needs_a_token_or_allow_anonymous(host: str) -> None:
    with pytest.raises(SettingsError, match=r"invalid setting server: .*allow_anonymous") as info:
        load_settings(overrides={"server": {"host": host}})
    assert "\n" not in str(info.value)
    secret = load_settings(overrides={"server": {"host": host, "token": "s3cret"}})
    assert secret.server.token is not None
    anonymous = load_settings(overrides={"server": {"host": host, "allow_anonymous": True}})
    assert anonymous.server.token is None
    off = load_settings(overrides={"server": {"host": host, "enabled": False}})
    assert not off.server.enabled


def test_serve_with_an_empty_token_exits_2_with_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "serve",
        env={
            "AFTERTUNE_SERVER__TOKEN": "",
            "AFTERTUNE_STATE_DIR": str(tmp_path / "state"),
            "AFTERTUNE_REDIS__URL": "redis://127.0.0.1:1/0",
        },
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "server.token" in done.stderr


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("AFTERTUNE_FOO", "no setting 'foo'"),
        ("AFTERTUNE_REDIS__URI", "did you mean AFTERTUNE_REDIS__URL?"),
        ("AFTERTUNE_STORES__URL", "did you mean AFTERTUNE_STORE__URL?"),
        ("AFTERTUNE_TRAIN__EPOCH", "did you mean AFTERTUNE_TRAIN__EPOCHS?"),
        ("AFTERTUNE_REDIS__URL__HOST", "no setting 'redis.url.host'"),
    ],
)
def test_an_unknown_environment_variable_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, hint: str
) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(SettingsError, match=f"unknown environment variable {name}") as info:
        load_settings()
    assert hint in str(info.value)


def test_every_aftertune_variable_the_project_uses_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settings, nested dict keys, and the variables that are not settings (failpoints...)."""
    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("*/*.py"), root / "Makefile", *root.glob("systemd/*")]
    used = set()
    for path in files:
        if path.name != "test_settings.py":
            used |= set(re.findall(r"AFTERTUNE_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert {"AFTERTUNE_FAILPOINT", "AFTERTUNE_REQUIRE_AVALANCHE", "AFTERTUNE_TOKEN"} <= used
    check_environment(dict.fromkeys(used, "1"))  # raises on the first unknown one
    check_environment({"AFTERTUNE_GATE__MAX_DROP__ACCURACY": "0.1", "aftertune_redis__url": ""})


def test_a_typo_in_the_environment_stops_the_cli_with_exit_2(tmp_path: Path) -> None:
    done = run_cli(
        "status", env={"AFTERTUNE_REDIS__URI": "redis://x", "AFTERTUNE_STATE_DIR": str(tmp_path)}
    )
    assert done.returncode == 2
    assert "AFTERTUNE_REDIS__URI" in done.stderr and done.stderr.count("\n") == 1


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTERTUNE_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"
    assert load_settings(overrides={"log_level": "Warning"}).log_level == "WARNING"
