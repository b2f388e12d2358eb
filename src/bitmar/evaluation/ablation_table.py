"""The ablation table: one row per (task, headline metric) aggregated over seeds, with the paired comparisons
full − variant, as JSON-ready rows (`aggregate`) and as Markdown (`markdown_table`); used by
`bitmar.evaluation.ablations`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bitmar.evaluation.ablation_stats import better_direction, paired_difference, summarize, verdict
from bitmar.evaluation.runner import format_value, md_cell

# Timings inside a metric's name ("... (0.52 s vs memory write 0.003 s)") differ per run: dropped from the row key.
_TIMING = re.compile(r"\s*\([^()]*\d\s*(?:s|ms|min)\b[^()]*\)")


def metric_key(metric: str) -> str:
    return _TIMING.sub("", metric).strip()


def _seed_rows(run: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    """(task, metric, value, reference, higher_is_better hint) of one run: every headline row of its evaluated
    tasks, and the final validation loss of its training."""
    rows = []
    for task, result in ((run.get("results") or {}).get("tasks") or {}).items():
        if result.get("status") != "ok":
            continue
        for h in result.get("headline", []):
            rows.append((task, metric_key(h["metric"]), h.get("value"), h.get("reference"), h.get("higher_is_better")))
    summary = run.get("summary") or {}
    if "final_validation_loss" in summary:
        rows.append(("training", "final validation loss", summary["final_validation_loss"], None, False))
    return rows


def aggregate(runs: dict[str, dict[int, dict[str, Any]]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (task, metric), in first-seen order: per-seed values, per-variant aggregates and, for every
    variant other than `full`, the paired difference full − variant with its verdict."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for variant in variants:
        for seed, run in sorted(runs.get(variant, {}).items()):
            for task, metric, value, reference, hint in _seed_rows(run):
                row = rows.setdefault(
                    (task, metric),
                    {"task": task, "metric": metric, "hint": None, "references": {}, "per_seed": {}},
                )
                if isinstance(hint, bool):
                    row["hint"] = hint
                row["per_seed"].setdefault(variant, {})[seed] = value
                row["references"].setdefault(variant, {})[seed] = reference
    table = []
    for row in rows.values():
        higher = better_direction(row["task"], row["metric"], row["hint"])
        aggregates = {v: summarize(list(row["per_seed"].get(v, {}).values())) for v in variants}
        # the reference column (chance, blind model, empty memory) of `full`, else of the first variant with the row
        references = row["references"].get("full") or next(iter(row["references"].values()))
        reference = summarize(list(references.values()))
        comparisons = {}
        full = row["per_seed"].get("full")
        if full is not None and (aggregates["full"] or {}).get("kind") == "numeric":
            for v in variants:
                if v == "full" or v not in row["per_seed"]:
                    continue
                diff = paired_difference(full, row["per_seed"][v])
                if diff is not None:
                    comparisons[v] = {**diff, "verdict": verdict(diff, higher)}
        table.append(
            {
                "task": row["task"],
                "metric": row["metric"],
                "higher_is_better": higher,
                "per_seed": {v: {str(s): x for s, x in vals.items()} for v, vals in row["per_seed"].items()},
                "aggregate": aggregates,
                "reference": reference,
                "comparisons": comparisons,
            }
        )
    return table


def format_aggregate(agg: dict[str, Any] | None) -> str:
    """'mean ± CI95 (n)' for numbers ('mean (1)' for one seed), '67% true (3)' for booleans, '—' when missing."""
    if agg is None:
        return "—"
    if agg["kind"] == "share_true":
        return f"{agg['share']:.0%} true ({agg['n']})"
    if agg["kind"] == "values":
        return md_cell(" / ".join(agg["values"])) + f" ({agg['n']})"
    if agg["mean"] is None:
        return f"non-finite ({agg['non_finite']})"
    text = format_value(agg["mean"])
    if agg["ci95"] is not None:
        text += f" ± {format_value(agg['ci95'])}"
    text += f" ({agg['n']}" + (f", {agg['non_finite']} non-finite" if agg["non_finite"] else "") + ")"
    return text


def format_difference(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "—"
    sign = "+" if diff["mean"] > 0 else ""
    text = sign + format_value(diff["mean"])
    if diff["ci95"] is not None:
        text += f" ± {format_value(diff['ci95'])}"
    return text + f" ({diff['n']})"


def _reference_cell(ref: dict[str, Any] | None) -> str:
    """The reference column: its mean over full's seeds (chance, blind model, empty memory...), yes/no for booleans."""
    if ref is None or ref["kind"] == "values" or (ref["kind"] == "numeric" and ref["mean"] is None):
        return ""
    if ref["kind"] == "share_true":
        return {1.0: "yes", 0.0: "no"}.get(ref["share"], f"{ref['share']:.0%} yes")
    return format_value(ref["mean"])


def _minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds else ""


def markdown_table(
    runs: dict[str, dict[int, dict[str, Any]]],
    variants: Sequence[str],
    seeds: Sequence[int],
    quick: bool,
    wall_seconds: float | None = None,
    jobs: int | None = None,
) -> str:
    table = aggregate(runs, variants)
    others = [v for v in variants if v != "full"]
    lines = [
        "# BitMar ablations" + (" (quick: 10 steps per epoch, smoke-test numbers)" if quick else ""),
        "",
        f"Seeds {', '.join(map(str, seeds))} (`--set training.seed=<s>`; data, tokenizer and pseudo-words fixed). "
        "Cells: mean ± half-width of the 95% confidence interval of the mean (Student t, n − 1 degrees of freedom) "
        "(n seeds); booleans: share of seeds where true; —: not measured (task skipped or run failed).",
        "",
        "| Task | Metric | " + " | ".join(variants) + " | Reference (full) |",
        "|---|---|" + "---:|" * (len(variants) + 1),
    ]
    for row in table:
        cells = [format_aggregate(row["aggregate"][v]) for v in variants]
        ref_cell = _reference_cell(row["reference"])
        lines.append(f"| {row['task']} | {md_cell(row['metric'])} | " + " | ".join(cells) + f" | {ref_cell} |")
    if "full" in variants and others:
        lines += [
            "",
            "## full vs each variant",
            "",
            "full − variant, paired by seed: mean of the per-seed differences ± half-width of its 95% CI (n pairs). "
            "Verdict only where the better direction is known (↑ higher, ↓ lower is better); 'no difference' when the "
            "CI includes 0.",
            "",
            "| Task | Metric | Better | " + " | ".join(f"full − {v} | verdict" for v in others) + " |",
            "|---|---|:-:|" + "---:|---|" * len(others),
        ]
        for row in table:
            if not row["comparisons"]:
                continue
            better = {True: "↑", False: "↓", None: ""}[row["higher_is_better"]]
            cells = []
            for v in others:
                diff = row["comparisons"].get(v)
                cells += [format_difference(diff), diff["verdict"] if diff else ""]
            lines.append(f"| {row['task']} | {md_cell(row['metric'])} | {better} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Runs",
        "",
        "| Variant | Seed | Training | Train time | Evaluation | Eval time | Final validation loss |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for variant in variants:
        for seed, run in sorted(runs.get(variant, {}).items()):
            train, evaluation = run["training"], run.get("evaluation") or {}
            loss = format_value((run.get("summary") or {}).get("final_validation_loss"))
            lines.append(
                f"| {variant} | {seed} | {train['status']} | {_minutes(train.get('seconds'))} "
                f"| {evaluation.get('status', '')} | {_minutes(evaluation.get('seconds'))} | {loss} |"
            )
    if wall_seconds is not None:
        count = sum(len(r) for r in runs.values())
        lines += ["", f"Wall time: {wall_seconds / 60:.1f} min for {count} runs, {jobs} at a time."]
    problems = []
    for variant in variants:
        for seed, run in sorted(runs.get(variant, {}).items()):
            for stage in ("training", "evaluation"):
                outcome = run.get(stage) or {}
                if outcome.get("status") == "failed":
                    error = " / ".join(outcome.get("error") or [])
                    problems.append(
                        f"- **{variant}/seed_{seed}** {stage} failed: `{md_cell(error)[-300:]}` (log: {outcome['log']})"
                    )
    if problems:
        lines += ["", *problems]
    reasons = sorted(
        {
            f"- {task} skipped for {variant}: {result.get('reason', '')}"
            for variant in variants
            for run in runs.get(variant, {}).values()
            for task, result in ((run.get("results") or {}).get("tasks") or {}).items()
            if result.get("status") == "skipped"
        }
    )
    if reasons:
        lines += ["", *reasons]
    return "\n".join(lines) + "\n"
