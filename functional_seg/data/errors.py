"""The exceptions every data reader raises: ``DataError`` (a bad file, named in a one-line message
that says what was expected), its ``MissingSplit`` (a split the dataset does not list) and
``DataWarning`` (bad files skipped with ``strict=False``, or a label set that looks wrong)."""

from __future__ import annotations

__all__ = ["DataError", "MissingSplit", "DataWarning"]


class DataError(ValueError):
    """Bad input data: the message names the file and what was expected."""


class MissingSplit(DataError):
    """The dataset has no such split (its split file is missing); ``data.splits`` names the flag."""


class DataWarning(UserWarning):
    """Bad samples skipped because ``strict=False``, or mask values that look wrong."""
