"""The exception a user can cause, and only that: the CLI reports a `UserError` in one line (exit
status 2); anything else is a bug and keeps its traceback. Imports nothing of lorakit.

Each subclass also derives from the built-in exception Python code expects (ValueError for a bad
value, FileNotFoundError for a missing file), so `except ValueError` keeps working for callers.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave: command line, config, data, model or adapter files."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value (LoraConfig, TrainConfig, run config sections)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist or is not what it should be."""


class OutputExistsError(UserError, FileExistsError):
    """An output that would overwrite something: a directory holding a previous run or other
    files (the message says which flag replaces it), or a file where a directory goes."""


class WriteError(UserError, OSError):
    """A file lorakit writes could not be written: disk full, file-size limit, no permission, a
    read-only file system. The message names the path; nothing half-written is left under it."""


class ModelFileError(UserError, ValueError):
    """Model files that cannot be read: a corrupt config.json, truncated or corrupt weights, a
    GGUF file of an architecture or tensor type transformers cannot read. The message names the
    file or directory and what the reader said."""
