"""The one exception the data pipeline raises for bad input data."""

from __future__ import annotations

from lorakit.errors import InputNotFoundError, UserError


class DataError(UserError, ValueError):
    """Bad training data. The message names the file, the line or row, and the problem."""


class DataFileNotFoundError(DataError, InputNotFoundError):
    """A data file or directory that does not exist (a missing path, and a data problem)."""


class ChatTemplateError(DataError):
    """A chat template whose rendering cannot be split into prompt and assistant spans."""
