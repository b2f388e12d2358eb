"""Checkpoint files: atomic, safe to load, holding everything needed to continue a run exactly.

A checkpoint is a plain dict of tensors and primitives (so it loads with `weights_only=True`):
model, optimizer, schedule, counters (phase/epoch/step/batch position), RNG states, the persistent
memory state, the resolved config and the tokenizer JSON. What a resume checks against the run (tokenizer,
model shape) lives in `bitmar.training.resume`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitmar.fileio import atomic_file

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "model", "config", "progress")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or from an incompatible run; the message says what to do."""


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write through `atomic_file` with fsync: a crash or power cut never leaves a torn or empty file."""
    path = Path(path)
    with atomic_file(path, fsync=True) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load safely (`weights_only=True`) and check that it is a BitMar checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file written by train_bitmar.py")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt files; all mean the same to a user
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is truncated or not a "
            "BitMar checkpoint — use another one (e.g. checkpoints/last.pt or best.pt)"
        ) from err
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a BitMar checkpoint (expected keys {REQUIRED_KEYS})")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format']}, this BitMar reads format {CHECKPOINT_FORMAT}"
        )
    return payload
