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
