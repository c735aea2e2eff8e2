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


class WriteError(UserError):
    """A file could not be written (disk full, read-only, quota): one line naming the file."""


class UnreadableFile(UserError):
    """A file bpfree reads back is missing, not a regular file, too large, or malformed: one line naming it."""
