"""Every error the store raises. Each message says what was wrong and, where it helps, what to do."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for errors raised by aftertune.store."""


class RecordError(StoreError, ValueError):
    """A feedback record is invalid; the message names the field and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RegistryError(StoreError):
    """A registry operation was refused; the message says why."""


class BundleError(StoreError):
    """A bundle is incomplete, tampered with or unknown; the message names the file."""


class StorageError(StoreError):
    """The disk refused a write or a read (full, I/O error, read-only, no permission).

    Nothing half-written stays: the transaction was rolled back. ``path`` is the file or
    directory concerned, ``cause`` SQLite's or the OS's own words.
    """

    def __init__(self, path: object, cause: str, action: str = "") -> None:
        message = f"cannot write {path}: {cause}"
        super().__init__(f"{message}; {action}" if action else message)
        self.path = path
        self.cause = cause


class SchemaError(StoreError):
    """A database's schema is newer than this code, or a migration cannot run; says which."""
