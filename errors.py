"""The error every tool turns into one line and a non-zero exit: bad input, named by file, row or flag."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message is one line naming the file and rows at fault."""
