"""The project's own error type for bad input: what the command line reports as one line (exit code 2).

``UserError`` subclasses ``ValueError`` so callers that catch ``ValueError`` keep working; the CLI reports
only this type (and ``ConfigError``, ``DataError``, ``CacheError``, a missing file) as a user's mistake. Any
other exception — a ``ValueError`` from NumPy or torch included — is a bug: it keeps its traceback and reaches
the run's log.txt."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a file, key, option or run state the user can fix); the message names it and the fix."""


class ConfigError(UserError):
    """A config file or override is invalid; the message names the file and key."""


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("<key>: <message>")`` unless ``ok``: the config sections' validation."""
    if not ok:
        raise ConfigError(f"{key}: {message}")
