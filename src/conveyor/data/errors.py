"""The one error type of the data package."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data input; the one-line message names the file or value and the fix."""
