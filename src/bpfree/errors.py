"""User-facing errors: one clear line, no traceback, non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in user input (config, data root, output directory...).

    The CLI prints ``str(error)`` as one line and exits with status 2; nothing else is shown.
    """


class ConfigError(UserError):
    """An invalid configuration field or file."""


class DataError(UserError):
    """A dataset that cannot be found or read."""
