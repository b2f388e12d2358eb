"""Figures saved under <output_dir>/plots/ (matplotlib, Agg backend): each titled, with labelled axes.

Every `plot_*` function takes plain arrays and a path and returns the path written. `RunFigures` draws a run's set
at an epoch end from the model, its memory store and metrics.jsonl, each through `bitmar.infra.figures.safe_plot`,
which turns a drawing failure into a warning: a plot that cannot be drawn never stops training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bitmar.bitnet import BitLinear  # noqa: E402
from bitmar.config import BitMarConfig  # noqa: E402
from bitmar.infra.figures import safe_plot, save_figure  # noqa: E402
from bitmar.infra.run_logger import RunLogger  # noqa: E402
from bitmar.memory import EpisodicStore  # noqa: E402
from bitmar.model import BitMar  # noqa: E402
from bitmar.training.diagnostics import component_of  # noqa: E402


def _slot_grid(values: np.ndarray) -> np.ndarray:
    """Lay K slot values out on a near-square grid (NaN-padded), so any slot count can be drawn."""
    k = values.size
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = math.ceil(k / cols)
    grid = np.full(rows * cols, np.nan, dtype=np.float64)
    grid[:k] = values
    return grid.reshape(rows, cols)


def plot_memory_slots(usage: np.ndarray, age: np.ndarray, path: Path, step: int) -> Path:
    """Two heatmaps: addressing mass per slot (relative to the busiest slot) and writes since a slot was last
    written."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for ax, values, title, label in (
        (axes[0], np.asarray(usage, dtype=np.float64), "Memory slot usage", "addressing mass / busiest slot's"),
        (axes[1], np.asarray(age, dtype=np.float64), "Memory slot age (writes since written)", "age"),
    ):
        grid = _slot_grid(values)
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(f"{title}, step {step}")
        ax.set_xlabel(f"slot index mod {grid.shape[1]}")
        ax.set_ylabel(f"slot index // {grid.shape[1]}")
        fig.colorbar(image, ax=ax, label=label)
    return save_figure(fig, path)


def plot_quantization(latent_weights: dict[str, dict[str, np.ndarray]], path: Path, step: int) -> Path:
    """Histogram of W / gamma of every ternary layer, one panel per component (text encoder, vision encoder,
    fusion, decoder, memory projections, ...), with the rounding thresholds at +-0.5 and the -1/0/+1 shares.

    latent_weights: {component: {layer name: W / gamma}}; a component's layers are pooled into one histogram."""
    components = [c for c in latent_weights if latent_weights[c]]
    if not components:
        raise ValueError("no ternary layers to draw")
    cols = min(3, len(components))
    rows = math.ceil(len(components) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel()[len(components) :]:
        ax.axis("off")
    for ax, component in zip(axes.ravel(), components, strict=False):
        layers = latent_weights[component]
        scaled = np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in layers.values()])
        ax.hist(np.clip(scaled, -3, 3), bins=60, color="tab:blue")
        for threshold in (-0.5, 0.5):
            ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1)
        ternary = np.clip(np.round(scaled), -1, 1)
        shares = [(ternary == v).mean() for v in (-1, 0, 1)]
        ax.set_title(
            f"{component} ({len(layers)} layers, {scaled.size:,} weights)\n"
            f"-1/0/+1: {shares[0]:.2f}/{shares[1]:.2f}/{shares[2]:.2f}",
            fontsize=8,
        )
        ax.set_xlabel("W / gamma (latent weight)")
        ax.set_ylabel("count")
    fig.suptitle(f"Ternary weight distributions by component, step {step}")
    return save_figure(fig, path)


def plot_compression(sizes: dict[str, tuple[int, int]], path: Path, step: int) -> Path:
    """Bytes as trained (float32) vs packed for inference (ternary layers at 2 bits) per component, with each
    component's compression ratio; the title gives the whole model's ratio. sizes: {component: (float, packed)}
    with a "total" entry (`bitmar.training.diagnostics.model_size_by_component`)."""
    parts = [c for c in sizes if c != "total" and sizes[c][0] > 0]
    if not parts or "total" not in sizes:
        raise ValueError("no component sizes to draw")
    unpacked = np.array([sizes[c][0] for c in parts], dtype=np.float64) / 2**20
    packed = np.array([sizes[c][1] for c in parts], dtype=np.float64) / 2**20
    x = np.arange(len(parts))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(parts)), 4.0), layout="constrained")
    ax.bar(x - 0.2, unpacked, width=0.4, label="float32 (as trained)", color="tab:gray")
    ax.bar(x + 0.2, packed, width=0.4, label="packed (2-bit ternary)", color="tab:green")
    for i, (u, p) in enumerate(zip(unpacked, packed, strict=True)):
        ax.text(i, max(u, p), f"{u / p:.1f}x" if p > 0 else "", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, parts, rotation=20, fontsize=8)
    ax.set_ylabel("MiB")
    total_u, total_p = sizes["total"]
    ax.set_title(f"Model size by component, step {step}: whole model {total_u / total_p:.2f}x smaller packed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


# Loss terms grouped by scale, one panel each, so that no term flattens the others (the memory KL sits at hundreds:
# it holds a constant 0.5 K (s^2 - 1 - log s^2), see "The memory KL term" in docs/training-and-logging.md).
LOSS_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("total", ("Training/Loss",)),
    (
        "token NLL terms",
        (
            "Training/Loss_lm",
            "Training/Loss_encoder_mlm",
            "Training/Loss_caption",
            "Training/Loss_visual_words",
            "Training/Loss_memory_reconstruction",
            "Training/Loss_memory_autoencoding",
            "Training/Loss_memory_slots",
        ),
    ),
    ("alignment / ranking", ("Training/Loss_contrastive", "Training/Loss_binding")),
    ("memory KL (per episode, summed over slots)", ("Training/Loss_memory_kl",)),
)


def loss_panels(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The panels of the loss figure: LOSS_GROUPS restricted to `keys`, unknown keys in an "other terms" panel."""
    panels, placed = [], set()
    for title, members in LOSS_GROUPS:
        present = [k for k in members if k in keys]
        placed.update(present)
        if present:
            panels.append((title, present))
    rest = [k for k in keys if k not in placed]
    if rest:
        panels.append(("other terms", rest))
    return panels


def plot_loss_panels(records: Sequence[dict[str, Any]], keys: Sequence[str], path: Path) -> Path:
    """Training losses against the optimizer step, one panel per group of terms (each with its own y axis)."""
    panels = [
        (title, members)
        for title, members in loss_panels(keys)
        if any(isinstance(r.get(k), (int, float)) for r in records for k in members)
    ]
    if not panels:
        raise ValueError(f"no values for {list(keys)} yet")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False, sharex=True)
    for ax, (title, members) in zip(axes[:, 0], panels, strict=True):
        for key in members:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=key.removeprefix("Training/"), linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle("Training losses")
    fig.tight_layout()
    return save_figure(fig, path)


class RunFigures:
    """The figures of a run (the `wandb.plot_*` switches), drawn into <output_dir>/plots/ and sent to the run logger.

    analysis_batch(phase, size): a fixed validation batch on the model's device (`Validator.analysis_batch`);
    model_sizes(): {component: (float32 bytes, packed bytes)} (`Diagnostics.model_sizes`).
    """

    def __init__(
        self,
        model: BitMar,
        store: EpisodicStore | None,
        cfg: BitMarConfig,
        logger: RunLogger,
        plot_dir: Path,
        *,
        analysis_batch: Callable[..., dict[str, Any]],
        model_sizes: Callable[[], dict[str, tuple[int, int]]],
    ) -> None:
        self.model = model
        self.store = store
        self.cfg = cfg
        self.logger = logger
        self.plot_dir = plot_dir
        self.analysis_batch = analysis_batch
        self.model_sizes = model_sizes

    def draw(self, phase: int, step: int) -> list[Path]:
        wb, plot_dir = self.cfg.wandb, self.plot_dir
        written: list[Path | None] = []
        if wb.plot_memory_usage and self.store is not None:
            written.append(self._memory_slots(step))
        if wb.plot_quantization_dist:
            latent = self._latent_weights()
            if latent:  # none in the full-precision ablation
                written.append(safe_plot(plot_quantization, latent, plot_dir / f"quantization_step_{step}.png", step))
            written.append(safe_plot(plot_compression, self.model_sizes(), plot_dir / "compression_ratio.png", step))
        if wb.plot_attention_heatmaps and self.cfg.model.use_vision:
            written += self._attention_heatmaps(phase, step)
        records = read_metrics(self.logger.metrics_path)
        loss_keys = sorted({k for r in records for k in r if k.startswith("Training/Loss")})
        written.append(safe_plot(plot_loss_panels, records, loss_keys, plot_dir / "loss_curves.png"))
        grad_keys = sorted({k for r in records for k in r if k.startswith("Gradients/")})
        if grad_keys:
            written.append(
                safe_plot(plot_curves, records, grad_keys, plot_dir / "gradient_norms.png", "Gradient norms", "L2 norm")
            )
        paths = [p for p in written if p is not None]
        for path in paths:
            self.logger.log_figure(f"Plots/{path.stem.split('_step_')[0]}", path, step)
        return paths

    def _memory_slots(self, step: int) -> Path | None:
        state = self.store.state if len(self.store) > 0 else self.model.memory.empty_state()
        mass = state.usage.detach().float()  # (K,) addressing mass of the held episodes
        usage = mass / mass.max() if bool(mass.max() > 0) else mass  # relative to the busiest slot, as logged
        path = self.plot_dir / f"memory_slots_step_{step}.png"
        return safe_plot(plot_memory_slots, usage.cpu().numpy(), state.age.float().cpu().numpy(), path, step)

    def _latent_weights(self) -> dict[str, dict[str, np.ndarray]]:
        """{component: {layer: W / gamma}} of every quantizing ternary layer."""
        latent: dict[str, dict[str, np.ndarray]] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, BitLinear) and module.quantize:
                weight = module.weight.detach().float()
                scaled = (weight / weight.abs().mean().clamp(min=1e-5)).cpu().numpy()
                latent.setdefault(component_of(name), {})[name] = scaled
        return latent

    def _attention_heatmaps(self, phase: int, step: int) -> list[Path | None]:
        batch = self.analysis_batch(max(phase, 2), size=2)
        with torch.no_grad():
            self.model.eval()
            out = self.model(
                batch["input_ids"],
                batch["attention_mask"],
                vision_features=batch["vision_features"],
                output_attentions=True,
            )
            self.model.train()
        written = []
        for kind in ("decoder", "cross_modal"):
            maps = out.attentions.get(kind) if out.attentions else None
            if maps:
                path = self.plot_dir / f"attention_{kind}_step_{step}.png"
                title = f"{kind} attention, last layer, step {step}"
                written.append(safe_plot(plot_attention_heatmap, maps[-1][0].float().cpu().numpy(), path, title))
        return written
