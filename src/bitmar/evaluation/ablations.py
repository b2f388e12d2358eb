"""Train the tiny model and its ablations, evaluate each, and print one comparison table.

    python -m bitmar.evaluation.ablations [--output_root outputs/ablations] [--quick] [--runs full no_memory ...]

Runs: `full` (configs/bitmar_tiny.yaml) and every configs/ablations/<name>.yaml (full_precision: model.quantize=false;
no_memory: model.use_memory=false; no_vision: model.use_vision=false). Each trains in its own process
(`train_bitmar.py --config ... --output_dir <output_root>/<name> --wandb disabled`, log in <run>/ablation_train.log)
unless the run directory already holds checkpoints/last.pt and summary.json (--retrain forces it), then is evaluated
on the same tasks (<run>/evaluation/results.{json,md}). The table (rows: headline metrics, columns: runs) goes to
stdout, <output_root>/ablations.md and <output_root>/ablations.json. `--quick` caps every epoch at
training.max_steps_per_epoch=10 steps (minutes on a laptop; numbers are then only a smoke test). A run whose training
fails is reported as failed with its log; the others still run (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bitmar.config import ConfigError
from bitmar.data.errors import DataError
from bitmar.evaluation.context import EvaluationError
from bitmar.evaluation.runner import atomic_write_text, format_value, load_run, md_cell, run_evaluation, write_results
from bitmar.training.checkpoint import CheckpointError
from bitmar.training.run_logger import setup_text_logging

REPO_ROOT = Path(__file__).resolve().parents[3]
RUNS = {
    "full": "configs/bitmar_tiny.yaml",
    "full_precision": "configs/ablations/full_precision.yaml",
    "no_memory": "configs/ablations/no_memory.yaml",
    "no_vision": "configs/ablations/no_vision.yaml",
}
QUICK_OVERRIDES = ["training.max_steps_per_epoch=10", "training.validation_batches=2"]
_TRAIN_ENTRY = "import sys; from bitmar.training.cli import main; sys.exit(main())"


def train_run(name: str, run_dir: Path, overrides: list[str], device: str, retrain: bool) -> dict[str, Any]:
    """Train one run in a subprocess (or reuse a finished one); returns {"status", "seconds", "log", ...}."""
    config = REPO_ROOT / RUNS[name]
    if not config.is_file():
        raise ConfigError(f"{config} does not exist: run the ablations from a source checkout of BitMar")
    done = (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "summary.json").is_file()
    log_path = run_dir / "ablation_train.log"
    if done and not retrain:
        return {"status": "reused", "seconds": None, "log": str(log_path)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)  # a stale summary must not mark a failed retrain as done
    command = [
        sys.executable, "-c", _TRAIN_ENTRY, "--config", str(config), "--output_dir", str(run_dir),
        "--wandb", "disabled", "--device", device, *[a for o in overrides for a in ("--set", o)],
    ]  # fmt: skip
    print(f"[{name}] training: {' '.join(command[3:])}  (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    if code != 0 or not (run_dir / "checkpoints" / "last.pt").is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        print(f"[{name}] training FAILED (exit {code}); last lines of {log_path}:\n  " + "\n  ".join(tail), flush=True)
        return {"status": "failed", "exit_code": code, "seconds": seconds, "log": str(log_path), "error": tail}
    return {"status": "trained", "seconds": seconds, "log": str(log_path)}


def evaluate_run(run_dir: Path, device: str) -> dict[str, Any]:
    model, tokenizer, cfg, payload = load_run(run_dir / "checkpoints" / "last.pt", device)
    data_dir = Path(cfg.data.data_dir)
    if not data_dir.is_absolute():
        data_dir = REPO_ROOT / data_dir  # training ran with the repository root as working directory
    info = {"checkpoint": str(run_dir / "checkpoints" / "last.pt")}
    results = run_evaluation(model, tokenizer, cfg, data_dir=data_dir, info=info)
    write_results(results, run_dir / "evaluation" / "results.json")
    return results


def comparison(runs: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows): one row per (task, headline metric) in first-seen order."""
    columns = list(runs)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, run in runs.items():
        for task, result in (run.get("results") or {}).get("tasks", {}).items():
            if result["status"] != "ok":
                continue
            for h in result["headline"]:
                key = (task, h["metric"].strip())
                new = {"task": task, "metric": key[1], "reference": h.get("reference"), "values": {}}
                row = rows.setdefault(key, new)
                row["values"][name] = h["value"]
    return columns, list(rows.values())


def _status_cell(run: dict[str, Any], task: str) -> str:
    results = run.get("results")
    if results is None:
        return "training failed"
    result = results["tasks"].get(task)
    return "skipped" if result is not None and result["status"] == "skipped" else "—"


def markdown_table(runs: dict[str, dict[str, Any]], quick: bool) -> str:
    columns, rows = comparison(runs)
    lines = [
        "# BitMar ablations" + (" (quick: 10 steps per epoch, smoke-test numbers)" if quick else ""),
        "",
        "| Task | Metric | " + " | ".join(columns) + " | Reference (full) |",
        "|---|---|" + "---:|" * (len(columns) + 1),
    ]
    for row in rows:
        cells = [
            format_value(row["values"][c]) if c in row["values"] else _status_cell(runs[c], row["task"])
            for c in columns
        ]
        ref = format_value(row["reference"])
        lines.append(f"| {row['task']} | {md_cell(row['metric'])} | " + " | ".join(cells) + f" | {ref} |")
    lines += ["", "| Run | Config | Training | Train time | Final validation loss |", "|---|---|---|---:|---:|"]
    for name, run in runs.items():
        train = run["training"]
        seconds = f"{train['seconds'] / 60:.1f} min" if train.get("seconds") else ""
        summary = run.get("summary") or {}
        loss = format_value(summary.get("final_validation_loss"))
        lines.append(f"| {name} | `{RUNS[name]}` | {train['status']} | {seconds} | {loss} |")
    failed = [n for n, r in runs.items() if r["training"]["status"] == "failed"]
    for name in failed:
        error = " / ".join(runs[name]["training"]["error"])
        lines.append(f"\n**{name}** training failed: `{md_cell(error)[-300:]}` (log: {runs[name]['training']['log']})")
    reasons = sorted(
        {
            f"- {task} skipped for {name}: {result['reason']}"
            for name, run in runs.items()
            for task, result in (run.get("results") or {}).get("tasks", {}).items()
            if result["status"] == "skipped"
        }
    )
    if reasons:
        lines += ["", *reasons]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bitmar.evaluation.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_root", default="outputs/ablations", help="one run directory per ablation here")
    parser.add_argument("--quick", action="store_true", help="training.max_steps_per_epoch=10: minutes, smoke numbers")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default all)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a finished run is there")
    parser.add_argument("--device", default="cpu", help="training and evaluation device (cpu, cuda, auto)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="extra training override for every run, e.g. --set training.max_epochs=5",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_text_logging(None, 0)
    root = Path(args.output_root).resolve()
    overrides = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    runs: dict[str, dict[str, Any]] = {}
    try:
        for name in args.runs:
            run_dir = root / name
            training = train_run(name, run_dir, overrides, device, args.retrain)
            run: dict[str, Any] = {"training": training, "run_dir": str(run_dir)}
            if training["status"] != "failed":
                run["summary"] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
                print(f"[{name}] evaluating", flush=True)
                run["results"] = evaluate_run(run_dir, device)
            runs[name] = run
    except (ConfigError, CheckpointError, EvaluationError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown_table(runs, args.quick)
    columns, rows = comparison(runs)
    record = {
        "quick": args.quick,
        "overrides": overrides,
        "runs": {n: {k: v for k, v in r.items() if k != "results"} for n, r in runs.items()},
        "table": rows,
    }
    atomic_write_text(root / "ablations.md", table)
    atomic_write_text(root / "ablations.json", json.dumps(record, indent=2, default=str) + "\n")
    print(table)
    print(f"written: {root / 'ablations.md'} and {root / 'ablations.json'}")
    return 1 if any(r["training"]["status"] == "failed" for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
