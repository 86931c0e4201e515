"""The two exceptions every data reader raises: ``DataError`` (a bad file, named in a one-line
message that says what was expected) and ``DataWarning`` (bad files skipped with ``strict=False``)."""

from __future__ import annotations

__all__ = ["DataError", "DataWarning"]


class DataError(ValueError):
    """Bad input data: the message names the file and what was expected."""


class DataWarning(UserWarning):
    """Bad samples skipped because ``strict=False``."""
