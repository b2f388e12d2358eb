"""The one error type of the Hugging Face export."""

from __future__ import annotations


class ExportError(ValueError):
    """A checkpoint, backbone, source module or output directory the export cannot use; the message says what to do."""
