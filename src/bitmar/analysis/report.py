"""Figures, console tables and the markdown report of the attention-head analysis (`analyze_attention_heads.py`).

    python analyze_attention_heads.py --analysis_dir RUN/attention_analysis --attention_type all \
        [--top_k K] [--create_report] [--output_dir OUT]

Reads the `history_{type}.npz` files (`bitmar.analysis.history`) that `bitmar.analysis.heads.HeadImportanceTracker`
writes during training (RUN itself is accepted too). Where things go:
  - figures: OUT (default: the analysis directory's `figures/`);
  - the report (`--create_report`): `RUN/reports/attention_analysis_report.md` (RUN = the analysis directory's
    parent), or `OUT/reports/attention_analysis_report.md` when --output_dir is given, so analysing a run you
    cannot write to puts everything under OUT. The report links its figures with relative paths.
Exit codes: 0 done, 2 bad input (missing or empty directory, unreadable history, a type that was never measured).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bitmar.analysis.history import ANALYSIS_TYPES, METRIC_NAMES, HeadHistory, history_path  # noqa: E402
from bitmar.fileio import atomic_write_text, check_writable_dir  # noqa: E402
from bitmar.infra.figures import save_figure  # noqa: E402

REPORT_NAME = "attention_analysis_report.md"
TYPE_TITLES = {
    "encoder": "Text encoder self-attention",
    "decoder": "Decoder self-attention",
    "cross_modal": "Cross-modal attention (text queries, vision keys)",
    "vision": "Vision encoder self-attention",
    "memory": "Decoder attention on the memory / vision prefix",
}


class AnalysisError(Exception):
    """Bad input for the CLI: printed as one clear message, exit code 2."""


def score_label(history: HeadHistory) -> str:
    if history.measure == "prefix_mass":
        return "attention mass on the prefix (EMA)"
    return "importance |g dL/dg| (EMA)"


# ------------------------------------------------------------------------------------------------ statistics


def head_sets(history: HeadHistory, k: int) -> list[set[tuple[int, int]]]:
    """The top-k (layer, head) set of every measurement."""
    return [{(int(r[0]), int(r[1])) for r in history.top_heads(k, index=i)} for i in range(len(history))]


def jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def stability(history: HeadHistory, k: int) -> dict[str, float | int | None]:
    """Jaccard overlap of consecutive top-k sets (mean, min), first vs last, and the step of the last change."""
    sets = head_sets(history, k)
    consecutive = [jaccard(a, b) for a, b in zip(sets[:-1], sets[1:], strict=True)]
    changes = [int(history.steps[i + 1]) for i, j in enumerate(consecutive) if j < 1.0]
    return {
        "measurements": len(sets),
        "consecutive_mean": float(np.mean(consecutive)) if consecutive else None,
        "consecutive_min": float(np.min(consecutive)) if consecutive else None,
        "first_vs_last": jaccard(sets[0], sets[-1]) if sets else None,
        "last_change_step": changes[-1] if changes else None,
    }


def top_head_rows(history: HeadHistory, k: int) -> list[list[str]]:
    """Rows (rank, layer, head, score, entropy, max weight[, readout mass]) of the latest measurement."""
    rows = []
    for rank, (layer, head, score) in enumerate(history.top_heads(k), start=1):
        layer, head = int(layer), int(head)
        row = [
            str(rank),
            str(layer),
            str(head),
            f"{score:.4g}",
            f"{history.entropy[-1, layer, head]:.3f}",
            f"{history.concentration[-1, layer, head]:.3f}",
        ]
        if history.measure == "prefix_mass":
            readout = history.readout_mass[-1, layer, head]
            row.append("-" if np.isnan(readout) else f"{readout:.3f}")
        rows.append(row)
    return rows


def top_head_headers(history: HeadHistory) -> list[str]:
    score = "prefix mass" if history.measure == "prefix_mass" else "importance"
    headers = ["rank", "layer", "head", score, "entropy (nats)", "max weight"]
    if history.measure == "prefix_mass":
        headers.append("readout mass")
    return headers


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | int | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------------- figures


def plot_head_heatmap(history: HeadHistory, path: Path, index: int = -1) -> Path:
    """Layer x head heatmap of the tracked score at measurement `index`; the top-K cells carry their rank."""
    scores = np.asarray(history.importance[index], dtype=np.float64)  # (L, H)
    step = int(history.steps[index])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * history.num_heads + 3.0), max(3.4, 0.5 * history.num_layers + 2.4)))
    image = ax.imshow(scores, aspect="auto", cmap="viridis", origin="upper")
    low, high = np.nanmin(scores), np.nanmax(scores)
    for rank, (layer, head, value) in enumerate(history.top_heads(index=index), start=1):
        bright = high > low and (value - low) / (high - low) > 0.6  # dark text on the bright end of viridis
        colour = "black" if bright else "white"
        ax.text(head, layer, f"#{rank}", ha="center", va="center", color=colour, fontsize=8, fontweight="bold")
    ax.set_xticks(range(history.num_heads))
    ax.set_yticks(range(history.num_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(
        f"{TYPE_TITLES.get(history.attention_type, history.attention_type)}\nhead scores, step {step}", fontsize=10
    )
    fig.colorbar(image, ax=ax, label=score_label(history))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_timeline(histories: dict[str, HeadHistory], path: Path, k: int) -> Path:
    """Tracked score over training of each type's top-k heads (as ranked at the latest measurement)."""
    kinds = [kind for kind in ANALYSIS_TYPES if kind in histories and len(histories[kind])]
    if not kinds:
        raise ValueError("no measurements to draw")
    fig, axes = plt.subplots(len(kinds), 1, figsize=(7.5, 2.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        history = histories[kind]
        for layer, head, _ in history.top_heads(k):
            layer, head = int(layer), int(head)
            ax.plot(
                history.steps, history.importance[:, layer, head], marker=".", linewidth=1.2, label=f"L{layer}H{head}"
            )
        ax.set_title(TYPE_TITLES.get(kind, kind), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("attention mass" if history.measure == "prefix_mass" else "|g dL/dg|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=min(5, k), loc="best")
    last = max(int(histories[kind].steps[-1]) for kind in kinds)
    fig.suptitle(f"Top-{k} attention heads over training (EMA), up to step {last}")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- loading


DEFAULT_RUN_DIR = Path("outputs")  # train_bitmar.py's default --output_dir


def resolve_analysis_dir(path: Path | None) -> Path:
    """The directory holding history_*.npz: the given one, or RUN/attention_analysis when given a run directory.

    None means the default run (`outputs/`, train_bitmar.py's default --output_dir). A relative path that does not
    exist but does under the default run is taken from there: the original invocation `--analysis_dir
    ./attention_analysis` from the repository root finds `outputs/attention_analysis`."""
    if path is None:
        path = DEFAULT_RUN_DIR
    if not path.exists() and not path.is_absolute() and (DEFAULT_RUN_DIR / path).is_dir():
        print(f"note: {path} does not exist; using {DEFAULT_RUN_DIR / path} (the default run's)", file=sys.stderr)
        path = DEFAULT_RUN_DIR / path
    if not path.exists():
        raise AnalysisError(
            f"analysis directory {path} does not exist: pass the attention_analysis/ folder of a training run "
            "(e.g. --analysis_dir runs/my_run/attention_analysis)"
        )
    if not path.is_dir():
        raise AnalysisError(f"{path} is a file, not a directory: pass the run's attention_analysis/ folder")
    has_history = any(history_path(path, kind).is_file() for kind in ANALYSIS_TYPES)
    if not has_history and (path / "attention_analysis").is_dir():
        return path / "attention_analysis"
    return path


def load_histories(analysis_dir: Path, required: Sequence[str] = ANALYSIS_TYPES) -> dict[str, HeadHistory]:
    """Every non-empty history in the directory, by type. An unreadable file of a `required` type is an AnalysisError
    naming it (and the --attention_type choices that still work); of another type, a warning on stderr. AnalysisError
    too when there is no history at all."""
    histories = {}
    for kind in ANALYSIS_TYPES:
        path = history_path(analysis_dir, kind)
        if not path.is_file():
            continue
        try:
            history = HeadHistory.load(path)
        except ValueError as err:
            if kind not in required:
                print(f"warning: {err}; left out of the report", file=sys.stderr)
                continue
            others = [k for k in ANALYSIS_TYPES if k != kind and history_path(analysis_dir, k).is_file()]
            hint = f", analyse the other types alone (--attention_type {' / '.join(others)})" if others else ""
            raise AnalysisError(
                f"{err}; delete it (training writes a new one on resume){hint}, or point --analysis_dir at another run"
            ) from err
        if len(history):
            histories[kind] = history
    if not histories:
        raise AnalysisError(
            f"no head-importance history (history_<type>.npz) in {analysis_dir}: training writes one every "
            "attention_analysis.log_every_n_steps optimizer steps when attention_analysis.enabled is true; "
            "train longer than that interval or point --analysis_dir at a run's attention_analysis/ folder"
        )
    return histories


# ----------------------------------------------------------------------------------------------------- report


def draw_all(histories: dict[str, HeadHistory], out_dir: Path, k: int) -> dict[str, Path]:
    """Heatmap per type + one timeline into out_dir -> {type or "timeline": path}."""
    figures = {}
    for kind, history in histories.items():
        step = int(history.steps[-1])
        figures[kind] = plot_head_heatmap(history, out_dir / f"attention_heads_{kind}_step_{step}.png")
    last = max(int(h.steps[-1]) for h in histories.values())
    figures["timeline"] = plot_timeline(histories, out_dir / f"attention_timeline_step_{last}.png", k)
    return figures


def _stability_sentence(stats: dict[str, float | int | None], k: int) -> str:
    if stats["consecutive_mean"] is None:
        return f"One measurement so far: the top-{k} set has no history to compare."
    change = stats["last_change_step"]
    changed = f"last changed at step {change}" if change is not None else "never changed"
    return (
        f"Top-{k} set stability over {stats['measurements']} measurements: Jaccard overlap of consecutive sets "
        f"mean {_fmt(stats['consecutive_mean'])} (min {_fmt(stats['consecutive_min'])}), first vs last "
        f"{_fmt(stats['first_vs_last'])}; the set {changed}."
    )


def _layer_trend_rows(history: HeadHistory, cube: np.ndarray) -> list[list[str]]:
    """Per layer: head-mean of `cube` at the first and the latest measurement."""
    return [
        [str(layer), f"{np.nanmean(cube[0, layer]):.3f}", f"{np.nanmean(cube[-1, layer]):.3f}"]
        for layer in range(history.num_layers)
    ]


def build_report(
    histories: dict[str, HeadHistory],
    selected: Sequence[str],
    k: int,
    figures: dict[str, Path],
    report_dir: Path,
    analysis_dir: Path,
) -> str:
    def link(path: Path) -> str:
        return Path(os.path.relpath(path, report_dir)).as_posix()

    lines = [
        "# Attention-head analysis",
        "",
        f"Analysis directory: `{analysis_dir}`; generated {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "**Method.** Head importance is the first-order estimate of the loss change when a head is removed, "
        "I_h = |g_h · ∂L/∂g_h| at the training gates g = 1 (Michel et al. 2019; Molchanov et al. 2019), from one "
        "backward pass of the phase's training objective on a small analysis batch, averaged over measurements "
        "with a bias-corrected exponential moving average. Entropy (nats) and max weight are the mean over real "
        "query positions of each head's attention distribution on the same batch. Memory heads are decoder heads "
        "scored by the attention mass text queries put on the decoder prefix (memory readout tokens, then vision "
        "tokens).",
        "",
        "## Overview",
        "",
    ]
    overview = []
    for kind in selected:
        history = histories[kind]
        stats = stability(history, k)
        layer, head, score = history.top_heads(1)[0]
        overview.append(
            [
                kind,
                f"{history.num_layers}×{history.num_heads}",
                str(len(history)),
                f"{int(history.steps[0])}–{int(history.steps[-1])}",
                f"L{int(layer)}H{int(head)} ({score:.3g})",
                _fmt(stats["consecutive_mean"]),
                _fmt(stats["first_vs_last"]),
            ]
        )
    lines += [
        markdown_table(
            [
                "type",
                "layers×heads",
                "measurements",
                "steps",
                "top head (score)",
                f"top-{k} Jaccard, consecutive",
                f"top-{k} Jaccard, first vs last",
            ],
            overview,
        ),
        "",
        f"![Top-{k} heads over training]({link(figures['timeline'])})",
        "",
        f"*Timeline:* the tracked score of each type's current top-{k} heads at every measurement.",
        "",
    ]
    for kind in selected:
        history = histories[kind]
        lines += [
            f"## {TYPE_TITLES[kind]} (`{kind}`)",
            "",
            f"Latest measurement: step {int(history.steps[-1])} (phase {int(history.phases[-1])}), "
            f"{score_label(history)}.",
            "",
            markdown_table(top_head_headers(history), top_head_rows(history, k)),
            "",
            _stability_sentence(stability(history, k), k),
            "",
            f"![{kind} head heatmap]({link(figures[kind])})",
            "",
        ]
        if kind == "cross_modal":
            lines += [
                "### Cross-modal heads",
                "",
                "Mean entropy of the text queries' attention over the vision tokens, per layer, first vs latest "
                "measurement (lower = each text token attends to fewer vision tokens):",
                "",
                markdown_table(
                    ["layer", "entropy first", "entropy latest"], _layer_trend_rows(history, history.entropy)
                ),
                "",
            ]
        if kind == "memory":
            prefix, readout = int(history.prefix_length[-1]), int(history.readout_tokens[-1])
            first_prefix = ""
            if (int(history.prefix_length[0]), int(history.readout_tokens[0])) != (prefix, readout):
                first_prefix = (
                    f" (at step {int(history.steps[0])}: {int(history.prefix_length[0])} position(s), "
                    f"{int(history.readout_tokens[0])} readout; the memory readout joins the prefix in phase 3)"
                )
            lines += [
                "### Memory heads",
                "",
                f"Latest decoder prefix: {prefix} position(s), of which {readout} memory readout token(s) and "
                f"{prefix - readout} vision token(s){first_prefix}. Mean attention mass of text queries on the prefix "
                f"(all heads): {np.nanmean(history.raw_importance[0]):.3f} at step {int(history.steps[0])}, "
                f"{np.nanmean(history.raw_importance[-1]):.3f} at step {int(history.steps[-1])}.",
                "",
                markdown_table(
                    ["layer", "prefix mass first", "prefix mass latest"],
                    _layer_trend_rows(history, history.raw_importance),
                ),
                "",
            ]
            if readout and not np.isnan(history.readout_mass[-1]).all():
                lines += [
                    f"Mass on the memory readout token(s) alone, latest: {np.nanmean(history.readout_mass[-1]):.3f} "
                    "(heads averaged).",
                    "",
                ]
    missing = [kind for kind in ANALYSIS_TYPES if kind not in histories]
    if missing:
        lines += [
            "## Not measured",
            "",
            "No measurements for: " + ", ".join(f"`{m}`" for m in missing) + ". The cross-modal stack gets gradient "
            "from phase 3 on (its latent is the memory's episode value), the vision encoder and memory prefix need "
            "caption batches (phase >= 2), and text-only or memory-less models have no such heads.",
            "",
        ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analyze_attention_heads.py",
        description="Top attention heads of a BitMar run, figures and a markdown report, from the head-importance "
        "history the trainer writes under <run>/attention_analysis/.",
    )
    parser.add_argument(
        "--analysis_dir",
        default=None,
        help="the run's attention_analysis/ folder or the run folder (default: the default run, outputs/; a relative "
        "path missing here is also looked up under outputs/)",
    )
    parser.add_argument("--attention_type", default="all", choices=[*ANALYSIS_TYPES, "all"], help="default: all")
    parser.add_argument("--top_k", type=int, default=None, help="heads per type (default: the run's track_top_k)")
    parser.add_argument("--create_report", action="store_true", help="write reports/attention_analysis_report.md")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="figures (and reports/) go here; default: figures in ANALYSIS_DIR/figures, "
        "the report in the run's reports/",
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Path]:
    """The CLI's work; raises AnalysisError on bad input. Returns the written files by name."""
    if args.top_k is not None and args.top_k < 1:
        raise AnalysisError(f"--top_k must be >= 1, got {args.top_k}")
    analysis_dir = resolve_analysis_dir(Path(args.analysis_dir) if args.analysis_dir else None)
    required = ANALYSIS_TYPES if args.attention_type == "all" else (args.attention_type,)
    histories = load_histories(analysis_dir, required)
    if args.attention_type == "all":
        selected = [kind for kind in ANALYSIS_TYPES if kind in histories]
    elif args.attention_type in histories:
        selected = [args.attention_type]
    else:
        raise AnalysisError(
            f"no measurements of {args.attention_type!r} heads in {analysis_dir} (measured types: "
            f"{', '.join(histories)}); see docs/attention-analysis.md on which phase measures which heads"
        )
    k = args.top_k or max(h.track_top_k for h in histories.values())
    out_dir = Path(args.output_dir) if args.output_dir else analysis_dir / "figures"
    report_dir = (Path(args.output_dir) if args.output_dir else analysis_dir.parent) / "reports"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_writable_dir(out_dir)  # an existing read-only folder: fail before drawing, not at the first figure
        if args.create_report:
            report_dir.mkdir(parents=True, exist_ok=True)
            check_writable_dir(report_dir)
    except OSError as err:
        raise AnalysisError(f"cannot write the output folder ({err}); pass a writable --output_dir") from err

    for kind in selected:
        history = histories[kind]
        print(
            f"\n== {kind}: {TYPE_TITLES[kind]} — {history.num_layers} layers × {history.num_heads} heads, "
            f"{len(history)} measurements (steps {int(history.steps[0])}–{int(history.steps[-1])}), "
            f"{score_label(history)} =="
        )
        print(text_table(top_head_headers(history), top_head_rows(history, k)))
        print(_stability_sentence(stability(history, k), k))
    figures = draw_all({kind: histories[kind] for kind in selected}, out_dir, k)
    written = dict(figures)
    print(f"\nfigures: {out_dir}")
    if args.create_report:
        text = build_report(histories, selected, k, figures, report_dir, analysis_dir)
        written["report"] = atomic_write_text(report_dir / REPORT_NAME, text)
        print(f"report: {written['report']}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["METRIC_NAMES", "AnalysisError", "build_report", "draw_all", "main", "plot_head_heatmap", "plot_timeline"]
