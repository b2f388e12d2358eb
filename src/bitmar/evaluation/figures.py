"""Figures drawn from evaluation results (matplotlib, Agg). A figure that cannot be drawn logs a warning.

    python -m bitmar.evaluation.figures RESULTS.json [OUT.png]

`recall_curve`: one-shot nonce-word recall against the number of episodes N written into memory (episodic_recall),
with the empty-memory control, the decoding of the written value itself (oracle) and the slow-learning baseline.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def recall_curve_points(recall_metrics: dict[str, Any]) -> dict[str, Any]:
    """(N, memory recall, empty-memory recall) per written size, plus the oracle and slow-learning points."""
    sizes = [s for s in recall_metrics["sizes"] if s["written"] > 0]
    unique = {s["written"]: s for s in sizes}
    ns = sorted(unique)
    return {
        "n": ns,
        "memory": [unique[n]["memory"]["nonce_word_recall"] for n in ns],
        "exact": [unique[n]["memory"]["exact_match"] for n in ns],
        "empty": [unique[n]["empty_memory"]["nonce_word_recall"] for n in ns],
        "oracle": recall_metrics["oracle_written_value"]["nonce_word_recall"],
        "slow": [
            (s["episodes"], s["steps"], s["nonce_word_recall"]) for s in recall_metrics.get("slow_learning") or []
        ],
    }


def recall_curve(recall_metrics: dict[str, Any], path: str | Path, title: str = "") -> Path | None:
    """Draw the recall curve into `path` (PNG); returns the path, or None (with a warning) when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        p = recall_curve_points(recall_metrics)
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
        ax.plot(p["n"], p["memory"], "o-", label="memory, one write (nonce-word recall)")
        ax.plot(p["n"], p["exact"], "s--", label="memory, one write (exact caption)")
        ax.plot(p["n"], p["empty"], "x:", color="grey", label="empty memory")
        ax.axhline(p["oracle"], color="green", lw=0.8, ls="-.", label="decoding the written value (oracle)")
        for steps, marker in ((1, "v"), (10, "^")):
            pts = [(n, r) for n, k, r in p["slow"] if k == steps]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker, color="red", ls="", label=f"{steps} gradient step(s), no memory"
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("episodes written at once (N)")
        ax.set_ylabel("recall")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title or "one-shot recall of held-out pseudo-words")
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path
    except Exception as err:  # a figure is a convenience: training/evaluation results are already safe
        log.warning("could not draw the recall curve %s: %s", path, err)
        return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m bitmar.evaluation.figures RESULTS.json [OUT.png]", file=sys.stderr)
        return 2
    results_path = Path(args[0])
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        recall = results["tasks"]["episodic_recall"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(
            f"error: {results_path} holds no episodic_recall metrics ({err}); run evaluate_bitmar.py", file=sys.stderr
        )
        return 2
    out = Path(args[1]) if len(args) > 1 else results_path.with_name("recall_curve.png")
    return 0 if recall_curve(recall, out) else 1


if __name__ == "__main__":
    sys.exit(main())
