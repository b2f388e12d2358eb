"""Where a run stands (`Progress`, saved in every checkpoint) and how its epochs are budgeted over the phases."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bitmar.config import BitMarConfig

PHASE_NAMES = {1: "text pretraining", 2: "vision-text alignment", 3: "episodic memory"}


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint, so a resume continues at the same batch."""

    phase: int = 1
    epoch: int = 0  # epoch within the phase
    batch: int = 0  # next micro-batch index within the epoch
    global_step: int = 0  # optimizer steps taken
    epochs_done: int = 0  # finished epochs over all phases
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    consecutive_nonfinite: int = 0
    skipped_nonfinite: int = 0
    initial_val_loss: float | None = None
    history: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def effective_phase_epochs(cfg: BitMarConfig, start_phase: int = 1) -> dict[int, int]:
    """Epochs per phase, fitted into training.max_epochs (proportionally, each enabled phase keeps >= 1).

    A budget smaller than the number of enabled phases gives every phase one epoch of `epoch_fraction(cfg)` of
    the data (e.g. max_epochs 1 with three phases: a third of an epoch each), so every phase still runs."""
    requested = {p: e for p, e in enumerate(cfg.phase_epochs(), start=1) if p >= start_phase and e > 0}
    budget = cfg.training.max_epochs
    if sum(requested.values()) <= budget:
        return requested
    if budget < len(requested):
        return {p: 1 for p in requested}
    total = sum(requested.values())
    shares = {p: max(1, int(budget * e / total)) for p, e in requested.items()}
    while sum(shares.values()) > budget:
        largest = max(shares, key=lambda p: shares[p])
        shares[largest] -= 1
    leftovers = sorted(requested, key=lambda p: budget * requested[p] / total - shares[p], reverse=True)
    for p in leftovers:
        if sum(shares.values()) >= budget:
            break
        shares[p] += 1
    return shares


def epoch_fraction(cfg: BitMarConfig, start_phase: int = 1) -> float:
    """Share of an epoch's batches that each epoch of this run covers: 1.0, or max_epochs / phases when the
    budget is smaller than the number of enabled phases (the total then stays within max_epochs of data)."""
    phases = sum(1 for p, e in enumerate(cfg.phase_epochs(), start=1) if p >= start_phase and e > 0)
    return min(1.0, cfg.training.max_epochs / max(phases, 1))
