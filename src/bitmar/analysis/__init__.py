"""Attention-head analysis: head importance, entropy and memory attention during training, and its report."""

from bitmar.analysis.heads import HeadImportanceTracker, attention_statistics, gate_importance, prefix_statistics
from bitmar.analysis.history import ANALYSIS_TYPES, HeadHistory, top_heads

__all__ = [
    "ANALYSIS_TYPES",
    "HeadHistory",
    "HeadImportanceTracker",
    "attention_statistics",
    "gate_importance",
    "prefix_statistics",
    "top_heads",
]
