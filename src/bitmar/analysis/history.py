"""The head-importance history of one attention type and its files (`history_{type}.npz`, `top_heads_*.npy`).

The data of the attention-head analysis, shared by the tracker that writes it during training
(`bitmar.analysis.heads`) and the figures and report that read it (`bitmar.analysis.report`).
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bitmar.fileio import atomic_file

GRADIENT_TYPES = ("encoder", "decoder", "cross_modal", "vision")
ANALYSIS_TYPES = (*GRADIENT_TYPES, "memory")
METRIC_NAMES = {
    "encoder": "Encoder",
    "decoder": "Decoder",
    "cross_modal": "CrossModal",
    "vision": "Vision",
    "memory": "Memory",
}
HISTORY_FORMAT = 1


def top_heads(scores: np.ndarray, k: int) -> np.ndarray:
    """(L, H) scores -> (K, 3) rows (layer, head, score), highest first; NaN scores rank last, ties by position."""
    flat = np.nan_to_num(np.asarray(scores, dtype=np.float64).ravel(), nan=-np.inf)
    k = max(0, min(int(k), flat.size))
    order = np.argsort(-flat, kind="stable")[:k]
    layers, heads = np.divmod(order, scores.shape[1])
    return np.stack([layers, heads, np.asarray(scores, dtype=np.float64).ravel()[order]], axis=1).reshape(k, 3)


@dataclass
class HeadHistory:
    """Measurements of one attention type, as saved in `history_{type}.npz` (S measurements, L layers, H heads).

    steps (S,) optimizer steps; phases (S,); importance (S, L, H) the tracked score (bias-corrected EMA of
    raw_importance; for "memory" of the prefix mass); raw_importance (S, L, H) this measurement's score;
    entropy, concentration (S, L, H); readout_mass (S, L, H) decoder mass on the memory readout tokens (memory
    type, NaN where the prefix held none); prefix_length, readout_tokens (S,) the decoder prefix composition
    (memory type; 0 elsewhere). measure: "gradient" (|g dL/dg|) or "prefix_mass".
    """

    attention_type: str
    measure: str
    num_layers: int
    num_heads: int
    ema_decay: float = 0.9
    track_top_k: int = 10
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    phases: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    importance: np.ndarray | None = None
    raw_importance: np.ndarray | None = None
    entropy: np.ndarray | None = None
    concentration: np.ndarray | None = None
    readout_mass: np.ndarray | None = None
    prefix_length: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    readout_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    CUBES = ("importance", "raw_importance", "entropy", "concentration", "readout_mass")

    def __post_init__(self) -> None:
        for name in self.CUBES:
            if getattr(self, name) is None:
                setattr(self, name, np.zeros((0, self.num_layers, self.num_heads), np.float32))

    def __len__(self) -> int:
        return int(self.steps.size)

    def append(
        self,
        step: int,
        phase: int,
        raw: np.ndarray,  # (L, H)
        entropy: np.ndarray,
        concentration: np.ndarray,
        readout_mass: np.ndarray | None = None,
        prefix_length: int = 0,
        readout_tokens: int = 0,
    ) -> np.ndarray:
        """Add one measurement; returns the new tracked score (L, H) (bias-corrected EMA over all rows)."""
        shape = (self.num_layers, self.num_heads)
        if raw.shape != shape:
            raise ValueError(f"{self.attention_type} measurement has shape {raw.shape}, the history {shape}")
        n = len(self) + 1
        beta = self.ema_decay
        previous = self.importance[-1].astype(np.float64) * (1 - beta ** (n - 1)) if n > 1 else np.zeros(shape)
        ema = beta * previous + (1 - beta) * raw
        score = ema / (1 - beta**n)
        if readout_mass is None:
            readout_mass = np.full(shape, np.nan)

        def grow(cube: np.ndarray, row: np.ndarray) -> np.ndarray:
            return np.concatenate([cube, np.asarray(row, np.float32)[None]], axis=0)

        self.steps = np.append(self.steps, np.int64(step))
        self.phases = np.append(self.phases, np.int64(phase))
        self.prefix_length = np.append(self.prefix_length, np.int64(prefix_length))
        self.readout_tokens = np.append(self.readout_tokens, np.int64(readout_tokens))
        self.importance = grow(self.importance, score)
        self.raw_importance = grow(self.raw_importance, raw)
        self.entropy = grow(self.entropy, entropy)
        self.concentration = grow(self.concentration, concentration)
        self.readout_mass = grow(self.readout_mass, readout_mass)
        return score

    def truncate_before(self, step: int) -> None:
        """Keep the measurements taken before `step` (a resumed run re-measures from there)."""
        keep = self.steps < step
        for name in ("steps", "phases", "prefix_length", "readout_tokens", *self.CUBES):
            setattr(self, name, getattr(self, name)[keep])

    def top_heads(self, k: int | None = None, index: int = -1) -> np.ndarray:
        """(K, 3) (layer, head, score) of measurement `index` (default the latest)."""
        return top_heads(self.importance[index], self.track_top_k if k is None else k)

    def save(self, path: Path) -> Path:
        arrays = {
            name: getattr(self, name) for name in ("steps", "phases", "prefix_length", "readout_tokens", *self.CUBES)
        }
        meta = {
            "format": np.int64(HISTORY_FORMAT),
            "attention_type": np.str_(self.attention_type),
            "measure": np.str_(self.measure),
            "ema_decay": np.float64(self.ema_decay),
            "track_top_k": np.int64(self.track_top_k),
        }
        return save_npz_atomic(path, {**arrays, **meta})

    @classmethod
    def load(cls, path: Path) -> HeadHistory:
        """Read a history file; raises ValueError naming the file when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                content = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # a truncated .npz: BadZipFile
            raise ValueError(f"{path} is not a readable head-history file, truncated or damaged ({err})") from err
        required = {"format", "attention_type", "measure", "steps", "importance", "entropy"}
        missing = sorted(required - set(content))
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}: not a history file written by bitmar.analysis")
        importance = content["importance"]
        if importance.ndim != 3 or importance.shape[0] != content["steps"].shape[0]:
            raise ValueError(
                f"{path}: importance has shape {importance.shape}, expected (S, L, H) with S = {content['steps'].size}"
            )
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in content.items() if k in names}
        kwargs["attention_type"] = str(content["attention_type"])
        kwargs["measure"] = str(content["measure"])
        kwargs["ema_decay"] = float(content.get("ema_decay", 0.9))
        kwargs["track_top_k"] = int(content.get("track_top_k", 10))
        kwargs["num_layers"], kwargs["num_heads"] = int(importance.shape[1]), int(importance.shape[2])
        history = cls(**kwargs)
        s = len(history)
        for name in ("phases", "prefix_length", "readout_tokens"):
            if getattr(history, name).shape != (s,):
                setattr(history, name, np.zeros(s, np.int64))
        for name in cls.CUBES:
            if getattr(history, name).shape != importance.shape:
                setattr(history, name, np.full(importance.shape, np.nan, np.float32))
        return history


def save_npz_atomic(path: Path, arrays: dict[str, Any]) -> Path:
    """np.savez through `atomic_file`: readers never see half a file. The temporary name ends in ".npz.tmp", the
    pattern the trainer's orphan cleanup recognises (written through a handle: np.savez would append ".npz")."""
    with atomic_file(path, suffix=".npz.tmp") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def save_npy_atomic(path: Path, array: np.ndarray) -> Path:
    """np.save through `atomic_file` (temporary name ending in ".npy.tmp", as `save_npz_atomic`)."""
    with atomic_file(path, suffix=".npy.tmp") as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    return path


def history_path(analysis_dir: Path, attention_type: str) -> Path:
    return Path(analysis_dir) / f"history_{attention_type}.npz"
