"""The one exception the data pipeline raises for bad input data."""

from __future__ import annotations

from lorakit.errors import UserError


class DataError(UserError, ValueError):
    """Bad training data. The message names the file, the line or row, and the problem."""


class ChatTemplateError(DataError):
    """A chat template whose rendering cannot be split into prompt and assistant spans."""
