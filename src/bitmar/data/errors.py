"""User-facing data errors.

`DataError` is raised for problems with the user's data (missing/corrupt files, mismatched counts,
bad encodings). It subclasses ValueError so callers that catch ValueError keep working.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data on disk that the user can fix (message says what, where and how)."""
