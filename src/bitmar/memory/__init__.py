"""Larimar episodic memory: the differentiable memory (`larimar`), its numerics and the inference store (`store`)."""

from __future__ import annotations

from bitmar.memory.larimar import EpisodicMemory, MemoryState
from bitmar.memory.store import EpisodicStore

__all__ = ["EpisodicMemory", "EpisodicStore", "MemoryState"]
