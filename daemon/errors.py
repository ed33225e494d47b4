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


class StateDirError(DaemonError):
    """The state dir cannot be made or written (one line: the path, the cause, what to do)."""

    exit_code = 2

    def __init__(self, path: object, exc: OSError) -> None:
        cause = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        super().__init__(
            f"state dir {path} is not writable: {cause}{where}; the daemon needs read, write "
            "and search permission (rwx) on it and on every directory above it that it must "
            "create; set state_dir (AFTERTUNE_STATE_DIR) to a directory it owns"
        )
