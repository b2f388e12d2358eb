"""`python -m bitmar.evaluation.ablation_compare A_ROOT B_ROOT`: two settings of one variant, paired by seed.

The ablation command compares variants of one configuration (full − no_memory, ...). To compare two *settings*
(e.g. `training.visual_words_alignment` ordered vs bag), run it once per setting into two output roots with the same
seeds, then pair the runs here:

    python -m bitmar.evaluation.ablations --runs full --seeds 5 --output_root outputs/vw_ordered
    python -m bitmar.evaluation.ablations --runs full --seeds 5 --output_root outputs/vw_bag \\
        --set training.visual_words_alignment=bag
    python -m bitmar.evaluation.ablation_compare outputs/vw_ordered outputs/vw_bag

Each root's `<variant>/seed_<s>/evaluation/results.json` (and `summary.json` for the final validation loss) is read;
seeds present in both roots are paired; every headline metric gets A and B as mean ± 95% CI and the paired
difference A − B with the same verdict rule as the ablation table. Prints Markdown; `--output` also writes it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from bitmar.evaluation.ablation_table import aggregate, format_aggregate, format_difference
from bitmar.evaluation.runner import md_cell
from bitmar.fileio import atomic_write_text

_SEED_DIR = re.compile(r"seed_(\d+)$")


class CompareError(ValueError):
    """A root that holds no evaluated runs, or two roots without a common seed; the message says which."""


def read_runs(root: Path, variant: str) -> dict[int, dict[str, Any]]:
    """{seed: {"results": results.json, "summary": summary.json or {}}} of every evaluated run under root/variant."""
    base = root / variant
    if not base.is_dir():
        raise CompareError(f"{base} does not exist: pass an --output_root of the ablation command (and --variant)")
    runs: dict[int, dict[str, Any]] = {}
    for run_dir in sorted(base.iterdir()):
        match = _SEED_DIR.search(run_dir.name)
        results = run_dir / "evaluation" / "results.json"
        if not match or not results.is_file():
            continue
        try:
            record = {"results": json.loads(results.read_text(encoding="utf-8"))}
            summary = run_dir / "summary.json"
            record["summary"] = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
        except (OSError, json.JSONDecodeError) as err:
            raise CompareError(f"{run_dir}: unreadable results ({err}); evaluate the run again") from None
        if not isinstance(record["results"], dict) or not isinstance(record["summary"], dict):
            raise CompareError(f"{run_dir}: results.json / summary.json is not a BitMar results object; evaluate again")
        runs[int(match.group(1))] = record
    if not runs:
        raise CompareError(f"{base} holds no evaluated run (seed_<s>/evaluation/results.json)")
    return runs


def compare(a_root: Path, b_root: Path, variant: str = "full") -> tuple[list[dict[str, Any]], list[int]]:
    """Table rows (as `ablation_table.aggregate`: B is the compared variant, A takes the place of `full`) over the
    seeds both roots hold, and those seeds."""
    a_runs, b_runs = read_runs(a_root, variant), read_runs(b_root, variant)
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        raise CompareError(
            f"{a_root} (seeds {sorted(a_runs)}) and {b_root} (seeds {sorted(b_runs)}) share no seed: run both with the "
            "same --seeds / --seed_base"
        )
    runs = {"full": {s: a_runs[s] for s in seeds}, "B": {s: b_runs[s] for s in seeds}}
    return aggregate(runs, ["full", "B"]), seeds


def markdown(rows: list[dict[str, Any]], seeds: list[int], a_name: str, b_name: str) -> str:
    lines = [
        f"A = {a_name}, B = {b_name}; seeds {', '.join(map(str, seeds))}; mean ± 95% CI; A − B paired by seed",
        "",
        "| Task | Metric | A | B | A − B | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        diff = row["comparisons"].get("B")
        a, b = row["aggregate"].get("full"), row["aggregate"].get("B")
        verdict = (diff or {}).get("verdict", "")
        verdict = verdict.replace("full better", "A better").replace("full worse", "A worse")
        cells = [row["task"], row["metric"], format_aggregate(a), format_aggregate(b), format_difference(diff), verdict]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitmar.evaluation.ablation_compare",
        description="Pair two ablation output roots (two settings, same seeds) and compare every headline metric.",
    )
    parser.add_argument("a_root", help="output root of setting A (python -m bitmar.evaluation.ablations --output_root)")
    parser.add_argument("b_root", help="output root of setting B, the same seeds")
    parser.add_argument("--variant", default="full", help="the variant to compare in both roots (default: full)")
    parser.add_argument("--output", help="also write the Markdown table to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    a_root, b_root = Path(args.a_root), Path(args.b_root)
    try:
        rows, seeds = compare(a_root, b_root, args.variant)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown(rows, seeds, str(a_root), str(b_root))
    if args.output:
        try:
            atomic_write_text(Path(args.output), table)
        except OSError as err:
            print(
                f"error: --output {args.output}: {err}; choose a file in a directory you can write to", file=sys.stderr
            )
            return 2
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
