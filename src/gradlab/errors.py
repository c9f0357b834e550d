"""The errors a user can act on, each reported by the CLI as one line (gradlab.cli).

ConfigError (exit 2): a config or command-line value that makes no sense; ``key`` names it.
DataError (exit 1): a data file is missing, corrupt or unreachable; the message names the file and the fix.
StorageError (exit 1): a path or tracking store cannot be written or reached (disk full, read-only,
server down); the message names it and what is already safe.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that type-checks but makes no sense; ``key`` is its dotted path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class DataError(RuntimeError):
    """A data file is missing, corrupt or unreachable; the message says which and what to do."""


class StorageError(RuntimeError):
    """A path or tracking store that cannot be written or reached; the message says which and what to do."""
