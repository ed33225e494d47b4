"""Every error the daemon and CLI raise on purpose; each says what was wrong and what to do."""

from __future__ import annotations


class DaemonError(Exception):
    """Base class; the CLI prints the message and exits with ``exit_code``."""

    exit_code = 1


class SettingsError(DaemonError):
    """A setting is invalid (one line: the field and why)."""

    exit_code = 2


class RedisUnavailable(DaemonError):
    """Redis cannot be reached at the configured URL."""


class EmbeddedRedisError(DaemonError):
    """The embedded Redis server could not be started."""


class ServerError(DaemonError):
    """The HTTP server could not start (most often: its port is taken)."""
