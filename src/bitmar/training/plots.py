"""Figures saved under <output_dir>/plots/ (matplotlib, Agg backend): each titled, with labelled axes.

Every function takes plain arrays and a path and returns the path written. The trainer calls them through
`safe_plot`, which turns a drawing failure into a warning: a plot that cannot be drawn never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bitmar.fileio import mkstemp  # noqa: E402

log = logging.getLogger("bitmar")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def safe_plot(draw: Callable[..., Path], *args: Any, **kwargs: Any) -> Path | None:
    try:
        return draw(*args, **kwargs)
    except Exception as err:  # graceful degradation, as users expect of plots
        log.warning("plot %s could not be drawn (%s: %s); training continues", draw.__name__, type(err).__name__, err)
        return None


def _slot_grid(values: np.ndarray) -> np.ndarray:
    """Lay K slot values out on a near-square grid (NaN-padded), so any slot count can be drawn."""
    k = values.size
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = math.ceil(k / cols)
    grid = np.full(rows * cols, np.nan, dtype=np.float64)
    grid[:k] = values
    return grid.reshape(rows, cols)


def plot_memory_slots(usage: np.ndarray, age: np.ndarray, path: Path, step: int) -> Path:
    """Two heatmaps: addressing mass per slot and steps since a slot was last written."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for ax, values, title, label in (
        (axes[0], np.asarray(usage, dtype=np.float64), "Memory slot usage (addressing mass)", "usage"),
        (axes[1], np.asarray(age, dtype=np.float64), "Memory slot age (steps since write)", "age"),
    ):
        grid = _slot_grid(values)
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(f"{title}, step {step}")
        ax.set_xlabel(f"slot index mod {grid.shape[1]}")
        ax.set_ylabel(f"slot index // {grid.shape[1]}")
        fig.colorbar(image, ax=ax, label=label)
    return _save(fig, path)


def plot_quantization(latent_weights: dict[str, np.ndarray], path: Path, step: int) -> Path:
    """Histogram of W / gamma for each ternary layer, with the rounding thresholds at +-0.5."""
    names = list(latent_weights)[:6]
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.6), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names, strict=True):
        scaled = np.asarray(latent_weights[name], dtype=np.float64).ravel()
        ax.hist(np.clip(scaled, -3, 3), bins=60, color="tab:blue")
        for threshold in (-0.5, 0.5):
            ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1)
        ternary = np.clip(np.round(scaled), -1, 1)
        shares = [(ternary == v).mean() for v in (-1, 0, 1)]
        ax.set_title(f"{name}\n-1/0/+1: {shares[0]:.2f}/{shares[1]:.2f}/{shares[2]:.2f}", fontsize=8)
        ax.set_xlabel("W / gamma (latent weight)")
        ax.set_ylabel("count")
    fig.suptitle(f"Ternary weight distributions, step {step}")
    return _save(fig, path)


def plot_attention_heatmap(weights: np.ndarray, path: Path, title: str, max_heads: int = 8) -> Path:
    """weights: (H, Tq, Tk) attention of one example; one panel per head."""
    weights = np.asarray(weights, dtype=np.float64)
    heads = min(weights.shape[0], max_heads)
    fig, axes = plt.subplots(1, heads, figsize=(2.8 * heads, 3.0), squeeze=False, layout="constrained")
    for h in range(heads):
        ax = axes[0][h]
        image = ax.imshow(weights[h], aspect="auto", cmap="magma", vmin=0.0)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.colorbar(image, ax=axes[0].tolist(), label="attention weight")
    fig.suptitle(title)
    return _save(fig, path)


def read_metrics(metrics_path: Path) -> list[dict[str, Any]]:
    if not metrics_path.is_file():
        return []
    with open(metrics_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_curves(records: Sequence[dict[str, Any]], keys: Sequence[str], path: Path, title: str, ylabel: str) -> Path:
    """Line plot of metric `keys` against the optimizer step (e.g. losses or gradient norms)."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    drawn = 0
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=key, linewidth=1.2)
            drawn += 1
    if drawn == 0:
        plt.close(fig)
        raise ValueError(f"no values for {list(keys)} yet")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
