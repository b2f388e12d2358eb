"""Hugging Face export: `python -m bitmar.export --checkpoint PATH --output_dir DIR` (see `hf_export`)."""

from __future__ import annotations

from bitmar.export.errors import ExportError
from bitmar.export.flatten import build_remote_code, flatten_sources
from bitmar.export.hf_export import export_checkpoint, score_sentences

__all__ = ["ExportError", "build_remote_code", "export_checkpoint", "flatten_sources", "score_sentences"]
