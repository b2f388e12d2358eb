"""Hugging Face export: `python -m bitmar.export --checkpoint PATH --output_dir DIR` (see `hf_export`)."""

from __future__ import annotations

from bitmar.export.hf_export import (
    ExportError,
    build_remote_code,
    export_checkpoint,
    flatten_sources,
    score_sentences,
)

__all__ = ["ExportError", "build_remote_code", "export_checkpoint", "flatten_sources", "score_sentences"]
