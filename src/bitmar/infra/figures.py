"""Figure files (matplotlib, Agg backend): one atomic PNG writer and a guard that turns a drawing failure into a
warning, so a figure that cannot be drawn never stops the run that asked for it (training, analysis, reports)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitmar.fileio import atomic_file  # noqa: E402

log = logging.getLogger("bitmar")


def save_figure(fig: Any, path: Path) -> Path:
    """Save `fig` as `path` (PNG, 90 dpi) through `atomic_file` and close it, written or not."""
    try:
        with atomic_file(path, suffix=".png") as tmp:  # matplotlib reads the format from the suffix
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
    return path


def safe_plot(draw: Callable[..., Path], *args: Any, **kwargs: Any) -> Path | None:
    """`draw(*args, **kwargs)`, or None and a warning when it raises."""
    try:
        return draw(*args, **kwargs)
    except Exception as err:  # graceful degradation, as users expect of plots
        log.warning("plot %s could not be drawn (%s: %s); training continues", draw.__name__, type(err).__name__, err)
        return None
